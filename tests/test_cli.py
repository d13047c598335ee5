"""The command line: help texts, a tiny discover run end to end, evaluate and draw on its circuit, errors."""

import json

import pytest
import torch

from circuits.cli import main
from circuits.task import make_task


@pytest.mark.parametrize("command", [[], ["discover"], ["evaluate"], ["draw"], ["view"], ["tasks"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: circuits" in capsys.readouterr().out


def test_discover_evaluate_draw_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "ioi"
    assert (
        main(
            [
                "discover",
                "--model",
                "tiny-llama",
                "--n",
                "4",
                "--batch-size",
                "2",
                "--edges",
                "40",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    for name in (
        "scores.pt",
        "circuit.json",
        "circuit.svg",
        "circuit.html",
        "faithfulness.png",
        "summary.json",
    ):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert "head_classes_wang_2022" not in summary  # GPT-2 small's IOI heads: the IOI script records them
    assert summary["metric"] == "logit_diff"  # IOI's own
    assert 0 < summary["circuit_edges"] <= 40 and "CPR" in summary and "CMD" in summary
    assert main(["evaluate", str(out / "circuit.json"), "--model", "tiny-llama", "--n", "4"]) == 0
    assert "faithfulness" in capsys.readouterr().out
    assert main(["draw", str(out / "circuit.json"), "--out", str(tmp_path / "c.png"), "--edges", "10"]) == 0
    assert (tmp_path / "c.png").exists()


def test_bad_arguments_say_what_is_accepted(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["discover", "--task", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["draw", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.svg")]) == 3
    assert "no such circuit file" in capsys.readouterr().err
    assert main(["tasks", "--model", "tiny-llama", "--baseline", "nope"]) == 2
    assert "unknown tasks" in capsys.readouterr().err


def test_discover_with_relp_rules_matches_the_api(tmp_path):
    from circuits import Graph, attribute
    from circuits.attribution import RelPRules
    from circuits.testing import tiny_llama

    out = tmp_path / "relp"
    args = ["discover", "--model", "tiny-llama", "--n", "4", "--batch-size", "2", "--method", "relp"]
    assert main([*args, "--rules", "ln", "cp", "--no-curve", "--edges", "20", "--out", str(out)]) == 0
    saved = torch.load(out / "scores.pt")["edge_scores"]
    model = tiny_llama()
    rules = RelPRules(ln=True, identity=False, half=False, cp=True)
    task = make_task(model, "ioi", 4)
    result = attribute(
        model, Graph.from_model(model), task.pairs, task.metric, "relp", rules=rules, batch_size=2, quiet=True
    )
    default = attribute(
        model, Graph.from_model(model), task.pairs, task.metric, "relp", batch_size=2, quiet=True
    )
    assert result.edge_scores is not None and default.edge_scores is not None
    torch.testing.assert_close(saved, result.edge_scores, rtol=0, atol=1e-6)
    assert not torch.allclose(saved, default.edge_scores, atol=1e-6)  # the rules reached the method


def test_discover_reports_intervals_and_stability(tmp_path, capsys):
    out = tmp_path / "ioi"
    args = ["discover", "--model", "tiny-llama", "--n", "6", "--batch-size", "3", "--method", "eap"]
    assert main([*args, "--edges", "30", "--resamples", "200", "--stability", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "95% intervals, 200 bootstrap draws" in printed and "stability over 2 resamples" in printed
    summary = json.loads((out / "summary.json").read_text())
    for key in ("faithfulness_interval", "CPR_interval", "CMD_interval"):
        low, high = summary[key]["low"], summary[key]["high"]
        assert low <= summary[key]["estimate"] <= high, key
    assert summary["faithfulness_interval"]["estimate"] == summary["faithfulness"]
    assert len(summary["stability"]["jaccard_to_full"]) == 2


def test_discover_selection_options_match_the_api(tmp_path):
    from circuits import Graph, attribute
    from circuits.attribution import ScoringOptions
    from circuits.evaluation.intervals import bootstrap_scores, sign_consistent
    from circuits.selection.strategies import ensemble_scores, ratio_selection, select
    from circuits.testing import tiny_llama

    out = tmp_path / "ratio"
    args = ["discover", "--model", "tiny-llama", "--n", "4", "--batch-size", "2", "--method", "eap"]
    options = ["--selection", "ratio", "--positive-fraction", "0.7", "--ensemble", "clean-corrupted"]
    options += ["--sign-consistency", "2", "--protocol", "pruned", "--max-memory", "4", "--edges", "25"]
    assert main([*args, *options, "--resamples", "0", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selection"] == "ratio(0.7)" and summary["protocol"] == "pruned"
    assert summary["ensemble"] == ["eap", "clean-corrupted"]
    assert summary["sign_consistency"] == {"resamples": 2, "agreement": 0.9}
    model = tiny_llama()
    task = make_task(model, "ioi", 4)
    graphs = []
    for method in ("eap", "clean-corrupted"):
        graphs.append(Graph.from_model(model))
        attribute(model, graphs[-1], task.pairs, task.metric, method, batch_size=2, quiet=True)
    scoring = ScoringOptions("eap", batch_size=2)
    resampled = bootstrap_scores(model, task.pairs, task.metric, scoring, resamples=2)
    ranked = sign_consistent(ensemble_scores(graphs), resampled)
    saved = torch.load(out / "scores.pt")["selection_scores"]
    torch.testing.assert_close(saved, ranked.scores, rtol=0, atol=1e-6)
    circuit = select(ranked, 25, ratio_selection(0.7))
    assert summary["circuit_edges"] == circuit.n_in_graph


def test_discover_refined_selection_is_the_api_refinement(tmp_path):
    from circuits import Graph, attribute
    from circuits.evaluation.refinement import refined_selection
    from circuits.selection.strategies import select
    from circuits.testing import tiny_llama

    out = tmp_path / "refined"
    args = ["discover", "--model", "tiny-llama", "--n", "4", "--batch-size", "2", "--method", "eap"]
    options = ["--selection", "refined", "--refine-rounds", "2", "--edges", "25", "--no-curve"]
    assert main([*args, *options, "--resamples", "0", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selection"] == "refined(top_n, 2 rounds)"
    model = tiny_llama()
    task = make_task(model, "ioi", 4)
    graph = Graph.from_model(model)
    attribute(model, graph, task.pairs, task.metric, "eap", batch_size=2, quiet=True)
    circuit = select(graph, 25, refined_selection(model, task.pairs, task.metric, rounds=2, batch_size=2))
    saved = json.loads((out / "circuit.json").read_text())["edges"]
    assert {e for e, v in saved.items() if v["in_graph"]} == set(circuit.edge_names(circuit.in_graph))


def test_discover_dtype_and_device_map_reach_the_model(tmp_path, capsys):
    from circuits import Graph, attribute
    from circuits.testing import tiny_llama

    args = ["discover", "--model", "tiny-llama", "--n", "4", "--batch-size", "2", "--method", "eap"]
    args += ["--edges", "20", "--no-curve", "--resamples", "0"]
    assert main([*args, "--dtype", "bfloat16", "--device-map", "auto", "--out", str(tmp_path / "bf16")]) == 0
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["dtype"] == "bfloat16"
    model = tiny_llama(dtype=torch.bfloat16)
    task = make_task(model, "ioi", 4)
    want = attribute(model, Graph.from_model(model), task.pairs, task.metric, "eap", batch_size=2, quiet=True)
    saved = torch.load(tmp_path / "bf16" / "scores.pt")["edge_scores"]
    assert want.edge_scores is not None and torch.equal(saved, want.edge_scores)
    assert main([*args, "--device", "cpu", "--device-map", "auto", "--out", str(tmp_path / "both")]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "both").exists()


def test_metric_option_scores_with_a_builtin_or_a_users_function(tmp_path, capsys):
    """`--metric` replaces the task's metric everywhere (scores, evaluation, the summary)."""
    base = ["--model", "tiny-llama", "--n", "4", "--batch-size", "2", "--no-curve", "--edges", "20"]
    for spec, name in [
        ("prob_diff", "prob_diff"),
        ("circuits.metrics:kl_divergence", "circuits.metrics:kl_divergence"),
    ]:
        out = tmp_path / name.replace(":", "_")
        method = "eap" if spec == "prob_diff" else "eap-ig-inputs"  # KL is flat where EAP takes its gradient
        assert main(["discover", *base, "--method", method, "--metric", spec, "--out", str(out)]) == 0
        assert json.loads((out / "summary.json").read_text())["metric"] == name
    assert main(["discover", *base, "--metric", "accuracy", "--out", str(tmp_path / "x")]) == 2
    assert "unknown metric 'accuracy'" in capsys.readouterr().err
    assert (
        main(["discover", *base, "--metric", "circuits.metrics:nothing", "--out", str(tmp_path / "y")]) == 2
    )
    assert "cannot import 'nothing' from 'circuits.metrics'" in capsys.readouterr().err
    # the circuit file records its metric, and `evaluate` scores with it (saying so), unless --metric
    circuit_file = tmp_path / "prob_diff" / "circuit.json"
    assert json.loads(circuit_file.read_text())["metric"] == "prob_diff"
    evaluate = ["evaluate", str(circuit_file), "--model", "tiny-llama", "--n", "4", "--resamples", "0"]
    assert main(evaluate) == 0
    recorded = capsys.readouterr()
    assert "scoring with prob_diff, the metric" in recorded.err
    assert main([*evaluate, "--metric", "prob_diff"]) == 0
    assert capsys.readouterr().out == recorded.out
    assert main([*evaluate, "--metric", "logit_diff"]) == 0
    assert capsys.readouterr().out != recorded.out


def test_a_file_of_unequal_prompts_and_answers_of_several_tokens_runs_end_to_end(tmp_path, capsys):
    import csv

    rows = [
        ("The capital of Argentina is", "The capital of France, in Europe, is", " Buenos Aires", " Paris"),
        ("Then Tom flew to", "Then Anna flew to", " New York", " New Delhi"),
        (
            "When Mary and John went to the store, John gave a drink to",
            "Then Alice gave it to",
            " Mary",
            " John",
        ),
        ("Then Tom said hello to", "Then Anna and Bob said hi to", " Tom", " Anna"),
    ]
    data = tmp_path / "mine.csv"
    with data.open("w", newline="") as handle:
        csv.writer(handle).writerows([("clean", "corrupted", "answer", "distractor"), *rows])
    out = tmp_path / "out"
    base = ["discover", "--model", "tiny-llama", "--data", str(data), "--batch-size", "3", "--edges", "20"]
    assert main([*base, "--metric", "answer_logprob", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_pairs"] == 4 and summary["metric"] == "answer_logprob"
    assert "CPR" in summary
    assert "M(clean)-M(input patched)" in capsys.readouterr().out


def test_skip_invalid_drops_a_files_bad_rows(tmp_path, capsys):
    import csv

    clean, corrupted = (
        "When Mary and John went to the store, John gave a drink to",
        "When Mary and John went to the store, Alice gave a drink to",
    )
    rows = [
        (clean, corrupted, " Mary", " John"),
        ("Then Tom said hello to", "Then Anna said hello to you", " Tom", " Tomato"),
    ]
    data = tmp_path / "pairs.csv"
    with data.open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [("clean", "corrupted", "answer", "distractor"), rows[0], rows[1], rows[0]]
        )
    base = ["discover", "--model", "tiny-llama", "--data", str(data), "--batch-size", "2", "--no-curve"]
    base += ["--method", "eap", "--edges", "10", "--out", str(tmp_path / "out")]
    assert main(base) != 0
    assert "row 2: the answer" in capsys.readouterr().err
    assert main([*base, "--skip-invalid"]) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["n_pairs"] == 2


@pytest.mark.parametrize("own", ["tasks.py", "tasks/__init__.py"])
def test_a_users_own_tasks_module_does_not_shadow_the_installed_tasks(tmp_path, own):
    """The built-in tasks are installed as `circuits_tasks`: a researcher's tasks.py or tasks/ in the
    working folder (first on the path of `python -m`) leaves them found."""
    import subprocess
    import sys

    (tmp_path / own).parent.mkdir(exist_ok=True)
    (tmp_path / own).write_text("raise SystemExit('the user tasks module was imported')\n")
    listed = subprocess.run(
        [sys.executable, "-m", "circuits", "tasks"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert listed.returncode == 0, listed.stderr
    assert "ioi" in listed.stdout and "greater_than" in listed.stdout


def test_discover_on_the_ungrouped_graph_writes_eap_igs_edges(tmp_path):
    out = tmp_path / "u"
    base = ["discover", "--model", "tiny-llama", "--n", "4", "--batch-size", "2", "--edges", "30"]
    assert main([*base, "--method", "eap", "--ungrouped", "--resamples", "0", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["graph"] == "ungrouped" and "CPR" in summary
    edges = json.loads((out / "circuit.json").read_text())["edges"]
    assert "input->a1.h3<k>" in edges and not any(".kv" in e for e in edges)  # every query head's own
    assert main(["evaluate", str(out / "circuit.json"), "--model", "tiny-llama", "--n", "4"]) == 0


@pytest.mark.parametrize("schema", ["task", "differences", "answers", "file"])
def test_discover_by_position_matches_the_api(tmp_path, capsys, schema):
    """`discover --positions spans` writes the span circuit the API finds; a schema file works like the
    spans it holds."""
    from circuits import attribute, evaluate
    from circuits.span_graph import SpanGraph
    from circuits.spans import Spans, answer_marks
    from circuits.testing import tiny_llama

    model = tiny_llama()
    task = make_task(model, "ioi", 4)
    marks = answer_marks(task.pairs) if schema == "answers" else None
    spans = task.spans if schema == "task" else Spans.from_differences(task.pairs, marks=marks)
    assert spans is not None
    given = schema
    if schema == "file":
        given = str(tmp_path / "schema.json")
        rows = [row[row >= 0].tolist() for row in spans.index]
        (tmp_path / "schema.json").write_text(json.dumps({"spans": list(spans.names), "index": rows}))
    out = tmp_path / "spans"
    args = ["discover", "--model", "tiny-llama", "--n", "4", "--batch-size", "2", "--method", "eap"]
    assert main([*args, "--positions", "spans", "--schema", given, "--edges", "30", "--out", str(out)]) == 0
    graph = SpanGraph.from_model(model, spans)
    attribute(model, graph, task.pairs, task.metric, "eap", batch_size=2, spans=spans, quiet=True)
    circuit = graph.top_n(30)
    written = SpanGraph.from_json(out / "circuit.json")
    assert torch.equal(written.in_graph, circuit.in_graph) and torch.equal(
        written.in_crossing, circuit.in_crossing
    )
    summary = json.loads((out / "summary.json").read_text())
    expected = evaluate(model, circuit, task.pairs, task.metric, batch_size=2, spans=spans)
    assert summary["faithfulness"] == pytest.approx(expected.faithfulness, abs=1e-6)
    assert summary["spans"] == list(spans.names)
    assert "faithfulness" in capsys.readouterr().out


def test_discover_by_position_refuses_what_it_does_not_do(tmp_path, capsys):
    args = [
        "discover",
        "--model",
        "tiny-llama",
        "--n",
        "4",
        "--positions",
        "spans",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main([*args, "--ungrouped"]) != 0
    assert "--ungrouped" in capsys.readouterr().err
