"""Bad input ends in a typed error naming what was received and what is accepted, never in an internal
traceback or a plausible wrong number; nothing of the caller's is changed. One test per failure class."""

import json
import warnings

import pytest
import torch
from circuits_tasks import load_pairs

from circuits import Graph, attribute, evaluate, load_model
from circuits.cli import main
from circuits.data import PromptPairs
from circuits.errors import (
    CircuitsError,
    CircuitsWarning,
    FileFormatError,
    GraphMismatchError,
    InputError,
    ModelLoadError,
    NumericalError,
    UnsupportedModelError,
)
from circuits.evaluation.curves import mib_scores
from circuits.folders import replacing_folder
from circuits.metrics import logit_diff
from circuits.models.hooked import ModelSpec
from circuits.steering import steer, steering_vectors
from circuits.testing import tiny_llama_hf, tiny_tokenizer
from tests.pairs import make_pairs

PROMPT = "When Mary and John went to the store, John gave a drink to"


def test_hierarchy_kinds_are_the_builtin_kinds_callers_catch():
    assert issubclass(InputError, ValueError) and issubclass(FileFormatError, InputError)
    assert issubclass(GraphMismatchError, InputError) and issubclass(ModelLoadError, OSError)
    assert issubclass(NumericalError, ArithmeticError) and issubclass(UnsupportedModelError, CircuitsError)
    import circuits

    assert circuits.CircuitsError is CircuitsError and circuits.InputError is InputError


# ------------------------------------------------------------------------------------------- metrics
def test_metric_of_the_wrong_shape_is_refused(llama):
    pairs = make_pairs(llama)

    def two_columns(logits, pairs, clean_logits=None):
        return torch.stack([logit_diff(logits, pairs), logit_diff(logits, pairs)], 1)

    circuit = Graph.from_model(llama)
    with pytest.raises(InputError, match=r"shape \(3,\); got \(3, 2\) for batch 0 \(pairs 0-2\)"):
        evaluate(llama, circuit, pairs, two_columns)
    with pytest.raises(InputError, match=r"shape \(3,\); got \(\)"):
        attribute(llama, circuit, pairs, lambda lg, p, c=None: logit_diff(lg, p).sum(), "eap", quiet=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_metric_names_the_batch(llama, bad):
    pairs = make_pairs(llama)

    def broken(logits, pairs, clean_logits=None):
        values = logit_diff(logits, pairs)
        return values + torch.tensor([0.0, bad, 0.0], device=values.device)[: len(values)]

    with pytest.raises(NumericalError, match=r"row 1 of batch 0 \(pairs 0-1\)"):
        attribute(llama, Graph.from_model(llama), pairs, broken, "eap", batch_size=2, quiet=True)


def test_constant_metric_has_no_gradient_and_says_so(llama):
    pairs = make_pairs(llama)
    with pytest.raises(InputError, match="does not depend on the logits"):
        attribute(llama, Graph.from_model(llama), pairs, lambda lg, p, c=None: torch.ones(len(p)), "eap")


def test_nan_scores_are_not_ranked():
    graph = Graph.from_model(ModelSpec(1, 2, 2, 8, 4, 16))
    graph.scores[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="1 scores are NaN"):
        graph.top_n(3)


def test_unscored_graph_warns_once_selected():
    graph = Graph.from_model(ModelSpec(1, 2, 2, 8, 4, 16))
    with pytest.warns(CircuitsWarning, match="never scored"):
        graph.top_n(3)


# ------------------------------------------------------------------------------ options and sizes
@pytest.mark.parametrize(
    ("steps", "quadrature", "message"),
    [
        (10**7, "left", "above the limit of 1024 steps.*MAX_STEPS"),
        (10**6, "gauss-legendre", "above the limit"),
        (2.5, "left", r"whole number of steps, got 2\.5"),
        (True, "left", "whole number of steps"),
        (0, "left", ">= 1"),
    ],
)
def test_ig_steps_are_bounded_and_whole(llama, steps, quadrature, message):
    with pytest.raises(InputError, match=message):
        attribute(llama, Graph.from_model(llama), make_pairs(llama), ig_steps=steps, quadrature=quadrature)


def test_the_steps_limit_can_be_raised_on_purpose(monkeypatch):
    from circuits import quadrature

    monkeypatch.setattr(quadrature, "MAX_STEPS", 2048)
    assert quadrature.check_steps(2000) == 2000


def test_graph_of_another_width_is_refused(llama):
    spec = llama.spec
    other = ModelSpec(spec.n_layers, spec.n_heads, spec.n_kv_heads, 2 * spec.d_model, spec.d_head, spec.d_mlp)
    with pytest.raises(GraphMismatchError, match=r"d_model 128 does not fit .* d_model 64"):
        evaluate(llama, Graph.from_model(other), make_pairs(llama))


def test_mib_style_file_without_sizes_takes_them_from_the_model(llama, tmp_path):
    graph = Graph.from_model(llama)
    graph.scores = torch.randn(graph.valid.shape)
    circuit = graph.top_n(20)
    circuit.to_json(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    data["cfg"] = {k: data["cfg"][k] for k in ("n_layers", "n_heads", "parallel_attn_mlp")}
    data["cfg"]["n_key_value_heads"] = llama.spec.n_kv_heads
    (tmp_path / "c.json").write_text(json.dumps(data))
    loaded = Graph.from_json(tmp_path / "c.json")
    assert loaded.spec.d_model == 0
    pairs = make_pairs(llama)
    assert evaluate(llama, loaded, pairs).circuit == pytest.approx(evaluate(llama, circuit, pairs).circuit)
    assert loaded.spec.d_model == llama.spec.d_model


def test_mean_ablation_reference_lengths(llama):
    pairs = make_pairs(llama)  # prompts of different lengths, up to 14 tokens
    short = PromptPairs.from_strings(
        llama, ["Then Tom said"] * 2, ["Then Anna said"] * 2, [" Tom"] * 2, [" Anna"] * 2
    )
    with pytest.raises(InputError, match="at least as long as the prompts scored"):
        evaluate(llama, Graph.from_model(llama), pairs, ablation="mean", reference=short)
    mixed = make_pairs(llama)  # mixed lengths: one mean over all positions, any prompt length
    evaluate(llama, Graph.from_model(llama), short, ablation="mean", reference=mixed)


def test_prompts_longer_than_the_context_are_refused(llama):
    n = llama.n_ctx + 2
    ids = torch.full((1, n), 5)
    pairs = PromptPairs(ids, ids.clone(), torch.tensor([n]), torch.tensor([3]), torch.tensor([4]))
    with pytest.raises(InputError, match=f"pair 0 is {n} tokens long, more than the {llama.n_ctx} positions"):
        attribute(llama, Graph.from_model(llama), pairs, method="eap")


def test_token_ids_must_be_integers(llama):
    ids = torch.tensor([[1.0, 2.0]])
    with pytest.raises(InputError, match=r"integer token ids.*float32"):
        PromptPairs(ids, ids, torch.tensor([2]), torch.tensor([3]), torch.tensor([4]))
    with pytest.raises(InputError, match=r"answer of pair 0: token id 3\.7 is not an integer"):
        PromptPairs.from_ids(llama, [[1, 2]], [[1, 2]], [3.7], [4])  # type: ignore[list-item]


def test_answer_equal_to_distractor_warns(llama):
    with pytest.warns(CircuitsWarning, match="same answer and distractor"):
        PromptPairs.from_ids(llama, [[1, 2]], [[1, 3]], [5], [5])


def test_faithfulness_with_nothing_to_separate_is_a_numerical_error(llama):
    clean = [PROMPT, PROMPT]
    pairs = PromptPairs.from_strings(llama, clean, clean, [" Mary"] * 2, [" John"] * 2)
    graph = Graph.from_model(llama)
    graph.scores = torch.randn(graph.valid.shape)
    with pytest.raises(NumericalError, match="full model and the empty circuit score the same"):
        _ = evaluate(llama, graph.top_n(10), pairs).faithfulness
    with pytest.raises(NumericalError, match="score the same"):
        mib_scores(llama, graph, pairs, percentages=(10.0, 100.0), quiet=True)


# ------------------------------------------------------------------------------ caller's objects
def test_train_mode_and_trainable_parameters_are_left_as_the_caller_had_them(llama):
    pairs, graph = make_pairs(llama), Graph.from_model(llama)
    reference = attribute(llama, graph, pairs, method="eap", quiet=True).edge_scores
    llama.bridge.train()
    params = list(llama.bridge.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        scores = [attribute(llama, graph, pairs, method="eap", quiet=True).edge_scores for _ in range(2)]
        assert torch.equal(scores[0], scores[1]) and torch.equal(scores[0], reference)  # no dropout
        assert all(p.grad is None for p in params)  # nothing accumulated on the caller's parameters
        assert llama.bridge.training and all(p.requires_grad for p in params)  # restored
    finally:
        llama.bridge.eval()
        for p in params:
            p.requires_grad_(False)


def test_dropout_is_off_inside_every_call_even_in_train_mode():
    """GPT-2 with dropout 0.1 everywhere, put in train mode by its owner: its embedding dropout is called by
    the wrapped model without being registered under the bridge, and must be off too (it was not: scores
    moved by 0.1 from one call to the next)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    dropout = dict(resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=600, **dropout)
    model = load_model(GPT2LMHeadModel(config), tiny_tokenizer())
    pairs = make_pairs(model)
    reference = attribute(model, Graph.from_model(model), pairs, method="eap", quiet=True).edge_scores
    model.bridge.train()
    scores = [
        attribute(model, Graph.from_model(model), pairs, method="eap", quiet=True).edge_scores for _ in "ab"
    ]
    assert torch.equal(scores[0], scores[1]) and torch.equal(scores[0], reference)
    assert model.bridge.training and model.bridge.original_model.transformer.drop.training  # restored


def test_loading_a_model_object_leaves_it_untouched_and_can_repeat():
    hf = tiny_llama_hf(seed=2)
    hf.train()
    layer_types = [type(m) for m in hf.modules()]
    first = load_model(hf, tiny_tokenizer())
    second = load_model(hf, tiny_tokenizer(), check=False)
    assert [type(m) for m in hf.modules()] == layer_types and hf.training
    assert all(p.requires_grad for p in hf.parameters())
    ids = torch.tensor([[1, 5, 9, 4]])
    with torch.no_grad():
        assert torch.allclose(first(ids), second(ids)) and torch.allclose(
            first(ids), hf.eval()(ids).logits, atol=1e-5
        )


def test_model_built_from_a_config_loads():
    hf = tiny_llama_hf(seed=4)
    hf.config.architectures = None
    load_model(hf, tiny_tokenizer())


def test_unknown_model_name_is_a_load_error():
    with pytest.raises(ModelLoadError, match="embedded model"):
        load_model("no-such-org/no-such-model-xyz")


# ------------------------------------------------------------------------------------- steering
def test_steering_inputs(llama):
    with pytest.raises(InputError, match="at least 2 pairs"):
        steering_vectors(llama, [(PROMPT, " Mary", " John")], [0])
    with pytest.raises(InputError, match=r"k .* >= 1, got 0"):
        steering_vectors(llama, [(PROMPT, " Mary", " John")] * 2, [0], k=0)
    with (
        pytest.raises(InputError, match=r"must have shape \(64,\) \(d_model\), got \(1,\)"),
        steer(llama, {0: torch.ones(1)}, 1.0),
    ):
        pass


# ---------------------------------------------------------------------------------------- files
def bad_circuit(tmp_path, llama, edit):
    graph = Graph.from_model(llama)
    graph.to_json(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    data = edit(data)
    (tmp_path / "c.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return tmp_path / "c.json"


def first_edge(data):
    return next(iter(data["edges"]))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: {**d, "edges": {**d["edges"], first_edge(d): {"in_graph": "false"}}},
            r"\.in_graph must be true",
        ),
        (
            lambda d: {**d, "edges": {**d["edges"], first_edge(d): {"score": "abc"}}},
            r"\.score must be a number",
        ),
        (lambda d: {**d, "edges": 5}, "edges must be an object, got 5"),
        (lambda d: {**d, "cfg": {**d["cfg"], "n_layers": "two"}}, r"cfg\.n_layers must be a whole number"),
        (lambda d: 7, "a circuit file is a JSON object, got int"),
        (lambda d: json.dumps(d)[:100], "line 1, column .*not valid JSON.*complete"),
        (
            lambda d: {**d, "nodes": {"m0": {"in_graph": True, "neurons": [True, False]}}},
            "neuron-level circuit",
        ),
    ],
)
def test_malformed_circuit_json_names_file_and_field(tmp_path, llama, edit, message):
    path = bad_circuit(tmp_path, llama, edit)
    with pytest.raises(FileFormatError, match=message) as info:
        Graph.from_json(path)
    assert str(path) in str(info.value)


def test_corrupt_pt_names_the_file(tmp_path, llama):
    Graph.from_model(llama).to_pt(tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match=r"c\.pt: not a readable circuit \.pt file"):
        Graph.from_pt(tmp_path / "c.pt")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("rows.jsonl", '["a", "b"]\n', "row 1: expected an object with named fields, got a list"),
        (
            "latin.csv",
            "clean,corrupted,answer,distractor\nCaf\xe9,x,y,z\n".encode("latin-1"),
            "line 2: byte 0xe9 is not UTF-8",
        ),
        (
            "label.csv",
            "clean,corrupted,correct_idx,incorrect_idx\n"
            "Then Tom said hello to,Then Anna said hello to,3.7,4\n",
            r"column correct_idx: '3\.7' is not a token id",
        ),
        ("folder.csv", None, "is a folder"),
    ],
)
def test_bad_data_files_name_row_and_column(llama, tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(FileFormatError, match=message):
        load_pairs(llama, path)


def test_csv_with_a_byte_order_mark_loads(llama, tmp_path):
    text = "clean,corrupted,answer,distractor\nThen Tom said hello to,Then Anna said hello to, Tom, Anna\n"
    (tmp_path / "excel.csv").write_text("\ufeff" + text, encoding="utf-8")
    assert len(load_pairs(llama, tmp_path / "excel.csv").pairs) == 1


# ------------------------------------------------------------------------------ CLI and outputs
def test_cli_errors_are_one_line_with_distinct_exit_codes(tmp_path, capsys, monkeypatch):
    def last_err():
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        return err

    assert main(["tasks", "--model", "tiny-nope", "--baseline", "ioi"]) == 2
    assert "the toys are tiny-llama, tiny-gpt2" in last_err()
    assert main(["tasks", "--model", "no-such-org/no-such-model", "--baseline", "ioi"]) == 5
    assert "ModelLoadError" in last_err()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["discover", "--model", "tiny-llama", "--out", str(blocker / "out")]) == 2
    assert "cannot write" in last_err()
    (tmp_path / "c.pt").write_bytes(b"not a tensor file")
    assert main(["draw", str(tmp_path / "c.pt"), "--out", str(tmp_path / "c.svg")]) == 3
    assert "c.pt: not a readable" in last_err()

    from circuits import cli

    def interrupted(args):
        raise KeyboardInterrupt

    def refused(args):
        raise UnsupportedModelError("post-attention norm on the summed heads")

    monkeypatch.setitem(cli.COMMANDS, "tasks", interrupted)
    assert main(["tasks"]) == 130
    assert last_err() == "circuits tasks: interrupted; no output folder was changed"
    monkeypatch.setitem(cli.COMMANDS, "tasks", refused)
    assert main(["tasks"]) == 6
    assert "post-attention norm" in last_err()


def test_an_interrupted_run_leaves_the_previous_folder_as_it_was(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "circuit.json").write_text("old")
    (out / "faithfulness.png").write_text("old")
    (out / "notes.txt").write_text("mine")
    with (
        pytest.raises(KeyboardInterrupt),
        replacing_folder(out, ["circuit.json", "faithfulness.png"]) as staging,
    ):
        (staging / "circuit.json").write_text("new")
        raise KeyboardInterrupt
    assert (out / "circuit.json").read_text() == "old" and len(list(tmp_path.iterdir())) == 1
    with replacing_folder(out, ["circuit.json", "faithfulness.png"]) as staging:
        (staging / "circuit.json").write_text("new")
    assert (out / "circuit.json").read_text() == "new"
    assert not (out / "faithfulness.png").exists()  # the earlier run's file is not left beside the new one
    assert (out / "notes.txt").read_text() == "mine"  # the user's own file is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_arguments_of_the_wrong_type_are_named(llama):
    pairs, graph = make_pairs(llama), Graph.from_model(llama)
    with pytest.raises(InputError, match=r"pairs must be PromptPairs .* got list"):
        attribute(llama, graph, [PROMPT], method="eap")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"graph must be a Graph .* got dict"):
        attribute(llama, {}, pairs, method="eap")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"attribute takes a HookedModel first .* got Graph"):
        attribute(graph, graph, pairs)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="batch_size must be a whole number >= 1, got 0"):
        evaluate(llama, graph, pairs, batch_size=0)
    with pytest.raises(InputError, match="unknown method 'eap-ig'; choose one of"):
        attribute(llama, graph, pairs, method="eap-ig")


def test_warnings_for_an_emptied_circuit_and_a_completeness_miss(llama):
    """Two results that look fine but are not: a selection that pruning empties, IG scores that do not add
    up to the metric change they explain."""
    pairs, graph = make_pairs(llama), Graph.from_model(llama)
    graph.scores = torch.zeros_like(graph.scores)
    graph.scores[graph.src_index["m1"], graph.dst_index["m0"]] = -1.0  # runs backwards: invalid, dropped
    mlp_0 = graph.src_index["m0"]
    graph.scores[mlp_0, graph.dst_index["a1.h0<q>"]] = -1.0  # m0 -> a1.h0<q>, but a1.h0 reaches nothing
    with pytest.warns(CircuitsWarning, match=r"selection \(1 chosen\) was pruned to an empty circuit"):
        assert graph.top_n(1).n_in_graph == 0
    with pytest.warns(CircuitsWarning, match=r"selection \(1 chosen\) was pruned to an empty circuit"):
        assert graph.threshold(0.5).n_in_graph == 0  # the same edge, chosen by its score
    with warnings.catch_warnings():
        warnings.simplefilter("error", CircuitsWarning)
        assert graph.top_n(0).n_in_graph == 0  # nothing chosen: nothing to warn about
    with pytest.warns(CircuitsWarning, match=r"more ig_steps \(now 1\) or quadrature='gauss-legendre'"):
        found = attribute(
            llama, Graph.from_model(llama), pairs, method="eap-ig-inputs", ig_steps=1, quiet=True
        )
    assert found.completeness.relative_error > 10  # one left-rule step on this model: far off
    with warnings.catch_warnings():
        warnings.simplefilter("error", CircuitsWarning)  # within 1e-4 here: no warning
        options = dict(ig_steps=8, quadrature="gauss-legendre", quiet=True)
        attribute(llama, Graph.from_model(llama), pairs, method="eap-ig-inputs", **options)
    # token and neuron IG say so too
    from circuits.neurons import neuron_ig
    from circuits.steering import token_ig

    prompt = "When Mary and John went to the store, John gave a drink to"
    with pytest.warns(CircuitsWarning, match=r"token attributions .* more steps \(now 1\)"):
        far = token_ig(llama, prompt, " Mary", steps=1, quadrature="left")
    assert far.relative_error > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error", CircuitsWarning)
        token_ig(llama, prompt, " Mary", steps=4, quadrature="idgi")  # exact by construction
    with pytest.warns(CircuitsWarning, match=r"neuron attributions of layer .* more steps \(now 1\)"):
        neuron_ig(llama, [prompt], [" Mary"], steps=1, quadrature="left", quiet=True)
    # steering vectors attribute many prompts: their misses are reported once
    from circuits.steering import steering_vectors

    pairs = [(prompt, " Mary", " John"), ("Then Tom said hello to", " Tom", " Anna")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CircuitsWarning)
        steering_vectors(llama, pairs, [1], k=2, quiet=True, steps=1, quadrature="left")
    misses = [w for w in caught if "token attributions" in str(w.message)]
    assert len(misses) == 1 and "of the 2 pairs" in str(misses[0].message)


def test_pairs_made_by_another_tokenizer_are_refused(llama):
    """Ids mean text only for the tokenizer that made them: pairs remember it, another model refuses them
    (before, one model's ids ran on another as other text, without a word)."""
    from circuits.testing import tiny_llama_hf

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<extra>"])  # another vocabulary
    other = load_model(tiny_llama_hf(), tokenizer, check=False)
    pairs = make_pairs(llama)
    assert pairs.tokenizer == llama.tokenizer_signature and pairs[:1].tokenizer == pairs.tokenizer
    with pytest.raises(InputError, match="tokenized by another tokenizer than"):
        attribute(other, Graph.from_model(other), pairs, method="eap", quiet=True)
    by_hand = PromptPairs(pairs.clean, pairs.corrupted, pairs.lengths, pairs.answer, pairs.distractor)
    attribute(other, Graph.from_model(other), by_hand, method="eap", quiet=True)  # ids alone: not checked
    attribute(other, Graph.from_model(other), make_pairs(other), method="eap", quiet=True)


def test_answers_without_their_leading_space_warn_and_pieces_read_as_text(llama):
    """'Mary' after 'to' is two unlikely pieces for this tokenizer; ' Mary' is the next word. The warning
    says so (the pair is still made, as an answer of two tokens), and a single-token error shows the pieces
    as text."""
    clean = ["When Mary and John went to the store, John gave a drink to"]
    corrupted = ["When Mary and John went to the store, Alice gave a drink to"]
    with pytest.warns(CircuitsWarning, match="without a leading space \\(first: 'John'\\)"):
        pairs = PromptPairs.from_strings(llama, clean, corrupted, ["Mary"], ["John"])
    assert pairs.answer_tokens is not None  # 'Mar', 'y'
    with pytest.raises(InputError, match=r"'Mary' is 2 tokens \['Mar', 'y'\]"):
        llama.single_token_id("Mary")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CircuitsWarning)
        PromptPairs.from_strings(llama, clean, corrupted, [" Mary"], [" John"])
        spaced = [c + " " for c in clean], [c + " " for c in corrupted]
        PromptPairs.from_strings(llama, *spaced, ["Mary"], ["John"])  # a prompt ending in a space: no warning
