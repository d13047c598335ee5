"""Bad input and odd settings in the newer features: each gets the right result or a typed error that
says what it received and what it accepts, and no result file or output folder is lost or changed."""

from __future__ import annotations

import json
import math
import os
import re
import stat

import pytest
import torch

from circuits import Graph, attribute, evaluate, load_model
from circuits.cli import main
from circuits.errors import FileFormatError, GraphMismatchError, InputError
from circuits.evaluation.intervals import circuit_stability, faithfulness_interval, sign_consistent
from circuits.models import ModelSpec
from circuits.selection.strategies import select
from circuits.testing import tiny_llama_hf, tiny_tokenizer
from tests.pairs import make_pairs


@pytest.fixture(scope="module")
def scored(llama):
    graph = Graph.from_model(llama)
    attribute(llama, graph, make_pairs(llama), method="eap", level="node", quiet=True)
    attribute(llama, graph, make_pairs(llama), method="eap", quiet=True)
    return graph


def test_every_selection_honours_its_budget(scored):
    """`nodes` ignored its budget: 0 gave the input -> logits edge; -1, NaN and 2.5 were taken as 0."""
    for selection in ("top_n", "filled", "nodes", "random"):
        assert select(scored, 0, selection).n_in_graph == 0, selection
        for bad in (-1, math.nan, 2.5, True, scored.n_edges + 1):
            with pytest.raises(InputError, match="budget must be a whole number"):
                select(scored, bad, selection)  # type: ignore[arg-type]
    assert select(scored, 5, "nodes").n_in_graph <= 5


def test_signed_selection_of_magnitudes_is_refused(llama):
    graph = Graph.from_model(llama)
    attribute(llama, graph, make_pairs(llama), method="atp*", level="node", quiet=True)
    assert graph.node_scores is not None and bool((graph.node_scores >= 0).all()) and graph.node_magnitudes
    with pytest.raises(InputError, match="magnitudes"):
        graph.top_nodes(3, absolute=False)
    assert graph.top_nodes(3, absolute=True).n_in_graph > 0
    rescored = graph.with_scores(None, torch.randn(graph.n_sources))  # other node scores: signed again
    assert rescored.top_nodes(3, absolute=False) is not None


def test_token_ig_checks_its_target_and_rows(llama):
    from circuits.steering import token_ig

    prompt = "When Mary and John went to the store, John gave a drink to"
    for target in (-1, llama.d_vocab, 10**9):
        with pytest.raises(InputError, match="outside the vocabulary"):
            token_ig(llama, prompt, target=target, steps=4)
    for rows in (-1, 0, 2.5):
        with pytest.raises(InputError, match="max_rows must be a whole number"):
            token_ig(llama, prompt, target=5, steps=4, max_rows=rows)  # type: ignore[arg-type]


def test_bootstrap_counts_and_levels_are_checked(llama, scored):
    pairs = make_pairs(llama)
    evaluation = evaluate(llama, scored.top_n(20), pairs)
    for resamples in (1, -3, 10**9, 2.0):
        with pytest.raises(InputError, match="resamples must be a whole number from 2"):
            faithfulness_interval(evaluation, resamples)  # type: ignore[arg-type]
    for level in ("0.95", 1.0, 0.0, math.nan):
        with pytest.raises(InputError, match="level must be a number in"):
            faithfulness_interval(evaluation, 100, level)  # type: ignore[arg-type]
    interval = faithfulness_interval(evaluation, 2)
    assert interval.low <= interval.high
    with pytest.raises(InputError, match="resamples must be"):
        circuit_stability(llama, scored.top_n(20), pairs, n_edges=20, resamples=1)
    with pytest.raises(InputError, match="stability"):
        from circuits.pipeline import DiscoveryOptions

        DiscoveryOptions(stability=1)


def test_sign_consistency_takes_lists_and_refuses_too_few(scored):
    draws = [scored.scores + 0.01 * torch.randn_like(scored.scores) for _ in range(3)]
    from_list = sign_consistent(scored, draws)
    assert torch.equal(from_list.scores, sign_consistent(scored, torch.stack(draws)).scores)
    for few in ([], draws[:1], torch.empty(0, *scored.scores.shape)):
        with pytest.raises(InputError, match="2 or more resamples"):
            sign_consistent(scored, few)


def test_stability_and_submissions_refuse_another_models_circuit(llama, gpt2, tmp_path):
    other = Graph.from_model(gpt2)
    with pytest.raises(GraphMismatchError):
        circuit_stability(llama, other, make_pairs(llama), n_edges=5, resamples=2)
    from circuits.evaluation.submissions import read_submission, write_circuits

    mine = Graph.from_model(llama, ungrouped=True)
    mine.scores = torch.randn(mine.valid.shape)
    paths = write_circuits(mine, tmp_path, "ioi", "tiny")
    deeper = Graph(ModelSpec(3, 4, 4, 64, 16, 128, name="deeper"))  # another model's circuit among them
    deeper.to_json(paths[3], scores=False)
    with pytest.raises(FileFormatError, match="describe different graphs"):
        read_submission(paths[0].parent)


def test_submission_folders_are_plain_and_of_one_kind(llama, tmp_path):
    from circuits.evaluation.submissions import write_circuits, write_importances

    graph = Graph.from_model(llama, ungrouped=True)
    graph.scores = torch.randn(graph.valid.shape)
    with pytest.raises(InputError, match="nested folder"):
        write_circuits(graph, tmp_path, "ioi", "Qwen/Qwen2.5-0.5B")
    write_importances(graph, tmp_path, "ioi", "tiny")
    with pytest.raises(InputError, match="not both"):
        write_circuits(graph, tmp_path, "ioi", "tiny")
    write_circuits(graph, tmp_path / "b", "ioi", "tiny")
    with pytest.raises(InputError, match="not both"):
        write_importances(graph, tmp_path / "b", "ioi", "tiny")


def test_the_page_and_circuit_tracer_files_survive_odd_content(scored, tmp_path):
    from circuits.pictures.viewer import page_html
    from circuits.pictures.viewer.circuit_tracer import from_circuit_tracer, to_circuit_tracer

    circuit = scored.top_n(30)
    page = page_html(circuit, prompts=["a <!--<script> b </script> c & d"])
    block = re.search(r"<script type='application/json' id='circuit-data'>(.*?)</script>", page, re.S)
    assert block is not None and "<" not in block.group(1)  # nothing in the data can open or close a tag
    assert json.loads(block.group(1))["prompts"] == ["a <!--<script> b </script> c & d"]
    path = to_circuit_tracer(circuit, tmp_path / "graph.json")
    back = from_circuit_tracer(path)
    assert torch.equal(back.nodes_in_graph, circuit.nodes_in_graph)  # not every node back in the circuit
    assert back.node_scores is not None and bool(back.node_scores.isnan().any())  # nodes the file lacks
    json.loads(re.search(r"id='circuit-data'>(.*?)</script>", page_html(back), re.S).group(1))  # no NaN
    data = json.loads(path.read_text())
    path.write_text("\ufeff" + json.dumps(data), encoding="utf-8")  # a byte-order mark, as Excel writes
    assert torch.equal(from_circuit_tracer(path).in_graph, back.in_graph)
    for key, value in (("links", 5), ("nodes", None)):
        path.write_text(json.dumps({**data, key: value}))
        with pytest.raises(FileFormatError, match=f"{key} must be a list"):
            from_circuit_tracer(path)


def test_memory_budgets_and_devices_are_checked(llama):
    from circuits.attribution import ScoringOptions

    for bad in ("8", math.inf, math.nan, 0, -1, True):
        with pytest.raises(InputError, match="max_memory must be a finite positive number"):
            ScoringOptions(max_memory=bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        load_model(tiny_llama_hf(), tiny_tokenizer(), device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            load_model(tiny_llama_hf(), tiny_tokenizer(), device="cuda")
    with pytest.raises(InputError, match="does not have"):
        load_model(tiny_llama_hf(), tiny_tokenizer(), device_map={"model.layer.0": "cpu", "": "cpu"})
    with pytest.raises(InputError, match="places no device"):
        load_model(tiny_llama_hf(), tiny_tokenizer(), device_map={"model.layers.0": "cpu"})


def test_atp_star_runs_in_bfloat16():
    """AtP*'s probe compared bf16 patterns with float32's tolerance and refused every bf16 model."""
    model = load_model(tiny_llama_hf(), tiny_tokenizer(), dtype=torch.bfloat16)
    result = attribute(model, Graph.from_model(model), make_pairs(model), method="atp*", quiet=True)
    assert bool(result.edge_scores.isfinite().all()) and float(result.edge_scores.abs().max()) > 0


def test_refinement_checks_its_budget(llama, scored):
    from circuits.evaluation.refinement import refine

    for bad in (math.nan, 2.5, -1):
        with pytest.raises(InputError, match="budget must be a whole number"):
            refine(llama, scored.top_n(10), make_pairs(llama), budget=bad)  # type: ignore[arg-type]


def test_the_mib_loader_counts_and_explains_what_its_filter_drops(llama, tmp_path):
    from circuits_tasks import load_pairs

    rows = [
        {
            "prompt": "1+2=",
            "operator": "+",
            "label": 3.0,
            "random_counterfactual": {"prompt": "4+4=", "label": 8},
        },
        {
            "prompt": "5-2=",
            "operator": "-",
            "label": 3,
            "random_counterfactual": {"prompt": "6-1=", "label": 5},
        },
        {
            "prompt": "2+2=",
            "operator": "+",
            "label": 4,
            "random_counterfactual": {"prompt": "3+3=", "label": 6.0},
        },
    ]
    path = tmp_path / "arithmetic_addition.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(match=r"1 of 3 rows dropped by MIB's filter .*another operator"):
        task = load_pairs(llama, path, mib_task="arithmetic-addition")
    assert len(task.pairs) == 2 and task.dropped == 1  # labels 3.0 and 6.0 read as 3 and 6
    path.write_text(json.dumps(rows[1]))
    with pytest.raises(FileFormatError, match=r"no row of 1 is usable .*another operator"):
        load_pairs(llama, path, mib_task="arithmetic-addition")


def test_cli_flags_are_checked_before_any_work(tmp_path, capsys):
    base = ["discover", "--model", "tiny-llama", "--n", "4", "--out", str(tmp_path / "o")]
    assert main([*base, "--positive-fraction", "0.3"]) == 2
    assert "--positive-fraction applies to --selection ratio only" in capsys.readouterr().err
    assert main([*base, "--sign-consistency", "-1"]) == 2
    assert "sign_consistency" in capsys.readouterr().err
    assert main([*base, "--max-memory", "inf"]) == 2
    assert "max_memory must be a finite positive number" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_summary_records_what_changes_the_numbers(tmp_path):
    out = tmp_path / "o"
    args = [
        "discover",
        "--model",
        "tiny-llama",
        "--n",
        "4",
        "--batch-size",
        "2",
        "--edges",
        "20",
        "--no-curve",
    ]
    args += ["--method", "relp", "--rules", "ln", "--quadrature", "midpoint", "--max-memory", "2"]
    assert main([*args, "--seed", "3", "--resamples", "0", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    scoring = summary["scoring"]
    assert scoring["rules"] == ["ln"] and scoring["quadrature"] == "midpoint" and scoring["max_memory"] == 2
    assert summary["seed"] == 3 and summary["version"] and summary["dtype"]


def test_output_folders_are_checked_and_kept_as_they_were(tmp_path, monkeypatch):
    base = ["discover", "--model", "tiny-llama", "--n", "4", "--batch-size", "2", "--edges", "20"]
    base += ["--no-curve", "--resamples", "0", "--method", "eap"]
    monkeypatch.chdir(tmp_path)
    assert main([*base, "--out", "."]) == 2  # before any work, and nothing stranded
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    target = tmp_path / "real"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    os.chmod(target, 0o755)
    (tmp_path / "link").symlink_to(target)
    assert main([*base, "--out", "link"]) == 0
    assert (tmp_path / "link").is_symlink() and (target / "summary.json").exists()
    assert (target / "notes.txt").read_text() == "mine"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_a_call_without_a_budget_fits_what_is_free(llama, monkeypatch, capsys):
    """No max_memory: the plan fits the memory free now (here: pretended to be half of what the call
    needs at batch 8), says so on stderr, and the scores do not change."""
    from circuits.attribution import ScoringOptions, memory

    pairs = make_pairs(llama)
    options = ScoringOptions(method="eap-ig-inputs", batch_size=8, max_rows=64)
    need = memory.estimate_bytes(llama, Graph.from_model(llama), options, pairs.n_positions, True)
    spare = need - llama.parameter_bytes - memory.PROCESS_BYTES
    monkeypatch.setattr(memory, "free_bytes", lambda _model: int(0.5 * spare / memory.FREE_SHARE))
    planned = attribute(llama, Graph.from_model(llama), pairs, options=options)
    assert "memory: no max_memory given" in capsys.readouterr().err
    monkeypatch.setattr(memory, "free_bytes", lambda _model: None)  # unknown: the settings as given
    given = attribute(llama, Graph.from_model(llama), pairs, options=options, quiet=True)
    assert capsys.readouterr().err == ""
    torch.testing.assert_close(planned.edge_scores, given.edge_scores, rtol=1e-5, atol=1e-7)


def test_property_any_budget_gives_a_circuit_within_it_or_a_typed_error(scored):
    """Budgets drawn from a wide family (whole numbers in and out of range, floats, NaN, inf, bools,
    strings, None): every selection returns a circuit within the budget or raises InputError."""
    gen = torch.Generator().manual_seed(0)
    total = scored.n_edges
    family: list[object] = [0, 1, total, total + 1, -1, math.nan, math.inf, True, "5", None, 2.5, 10**12]
    family += [int(v) for v in torch.randint(-total, 2 * total, (12,), generator=gen)]
    for selection in ("top_n", "filled", "nodes", "random"):
        for budget in family:
            try:
                circuit = select(scored, budget, selection)  # type: ignore[arg-type]
            except InputError:
                assert not (isinstance(budget, int) and not isinstance(budget, bool) and 0 <= budget <= total)
                continue
            assert isinstance(budget, int) and circuit.n_in_graph <= budget, (selection, budget)


def test_property_a_corrupted_circuit_file_is_a_typed_error(scored, tmp_path):
    """Every field of a circuit file replaced by values of the wrong kind: reading it raises
    FileFormatError or GraphMismatchError (a CircuitsError), never another exception."""
    from circuits.errors import CircuitsError

    path = tmp_path / "c.json"
    scored.top_n(10).to_json(path)
    data = json.loads(path.read_text())
    edge = next(iter(data["edges"]))
    node = next(iter(data["nodes"]))
    bad_values: list[object] = [None, 5, "x", [], {}, -1.5, True]
    places = [("cfg",), ("nodes",), ("edges",), ("cfg", "n_layers"), ("cfg", "n_heads"), ("cfg", "d_model")]
    places += [("edges", edge), ("edges", edge, "score"), ("edges", edge, "in_graph"), ("nodes", node)]
    places += [("nodes", node, "in_graph"), ("metric",), ("score_sign",)]
    for place in places:
        for value in bad_values:
            broken = json.loads(json.dumps(data))
            target = broken
            for key in place[:-1]:
                target = target[key]
            target[place[-1]] = value
            path.write_text(json.dumps(broken))
            try:
                Graph.from_json(path)
            except CircuitsError:
                continue
            except Exception as err:
                pytest.fail(f"{place} = {value!r}: {type(err).__name__}: {err}")
