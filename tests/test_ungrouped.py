"""The ungrouped graph of grouped-query models (EAP-IG's and MIB's edge set), its exactness, and circuit
files read and written both ways.

References written apart from the engine: EAP-IG's edge names from its graph's rules (every query head
with its own q, k and v inputs), and exact patching by `tests.brute_force` on the ungrouped twin, a plain
forward in which query head h reads its own copy of the k / v projection.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from circuits import Graph, attribute, evaluate, load_model
from circuits.errors import CircuitsWarning, FileFormatError
from circuits.models import ModelSpec
from circuits.models.ungroup import ungrouped_model
from circuits.testing import tiny_tokenizer
from tests.architectures import ARCHITECTURES
from tests.brute_force import exact_scores
from tests.pairs import make_pairs

SMOLLM2 = ModelSpec(n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_head=64, d_mlp=1536, name="smollm2")


def eap_ig_edges(n_layers: int, n_heads: int, parallel: bool = False) -> set[str]:
    """EAP-IG's edge names: every upstream node (input, earlier heads and MLPs) into each head's q, k and
    v input, the MLP (also from its own layer's heads unless attention and MLP run in parallel), logits."""
    upstream, edges = ["input"], set()
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        edges |= {f"{u}->{h}<{x}>" for u in upstream for h in heads for x in "qkv"}
        edges |= {f"{u}->m{layer}" for u in upstream + ([] if parallel else heads)}
        upstream = [*upstream, *heads, f"m{layer}"]
    return edges | {f"{u}->logits" for u in upstream}


def _tiny(model_type: str):
    (arch,) = [a for a in ARCHITECTURES if a.model_type == model_type and not a.label]
    return load_model(arch.build(), tiny_tokenizer())


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma2", "olmo2"])
def gqa(request, llama):
    """Grouped-query models: Llama (2 of 4 heads), Qwen-2 (k / v biases), Qwen-3 (per-head q / k norms),
    Gemma-2 (post-norm blocks: one attention source per layer, per-head q / k / v inputs), OLMo-2 (q / k
    norms over all heads)."""
    return llama if request.param == "llama" else _tiny(request.param)


def test_smollm2s_ungrouped_graph_is_eap_igs():
    graph = Graph.from_model(SMOLLM2, ungrouped=True)
    expected = eap_ig_edges(SMOLLM2.n_layers, SMOLLM2.n_heads)
    assert graph.n_edges == len(expected) == 123_211
    assert set(graph.edge_names()) == expected
    assert Graph.from_model(SMOLLM2).n_edges == 70_651


def test_the_twin_computes_the_model_and_grouped_names_are_not_eap_igs(gqa):
    twin = ungrouped_model(gqa)
    assert twin.spec.n_kv_heads == gqa.spec.n_heads and twin is ungrouped_model(gqa)  # made once
    ids = make_pairs(gqa).clean
    with torch.no_grad():
        torch.testing.assert_close(twin(ids), gqa(ids), atol=1e-5, rtol=1e-5)
    spec = gqa.spec
    grouped = set(Graph.from_model(gqa).edge_names())
    eap_ig = eap_ig_edges(spec.n_layers, spec.n_heads)
    ungrouped = set(Graph.from_model(gqa, ungrouped=True).edge_names())
    if spec.per_head_sources:
        assert ungrouped == eap_ig
    else:  # post-norm: one exact attention source a{l} per layer where EAP-IG has per-head ones
        into = {e.split("->")[1] for e in ungrouped}
        assert into == {e.split("->")[1] for e in eap_ig}  # the same inputs: every query head's own k, v
    kv = {e for e in grouped if e.endswith(("<k>", "<v>"))}
    assert kv and not kv & eap_ig  # EAP-IG's loader refuses our grouped k / v edges, never misreads them


def test_gradient_scores_of_the_copies_sum_to_the_grouped_score(gqa):
    pairs = make_pairs(gqa)
    for method in ("eap", "eap-ig-inputs", "clean-corrupted"):
        grouped = Graph.from_model(gqa)
        ungrouped = Graph.from_model(gqa, ungrouped=True)
        g = attribute(gqa, grouped, pairs, method=method, quiet=True).edge_scores
        assert g is not None
        u = attribute(gqa, ungrouped, pairs, method=method, quiet=True).edge_scores
        summed = ungrouped.grouped(gqa.spec.n_kv_heads).scores
        scale = float(g.abs().max())
        assert float((summed - g).abs().max()) <= 1e-5 * scale, method
        copies = ungrouped.key_value_copies(gqa.spec.n_kv_heads)
        split = [j for j in range(len(copies)) if (copies == copies[j]).sum() > 1]
        assert not torch.allclose(u[:, split[0]], u[:, split[1]])  # the copies have scores of their own


def test_exact_patching_of_ungrouped_edges_matches_a_brute_force(gqa):
    pairs = make_pairs(gqa)
    graph = Graph.from_model(gqa, ungrouped=True)
    exact = attribute(gqa, graph, pairs, method="exact", quiet=True).edge_scores
    expected = exact_scores(ungrouped_model(gqa), graph, pairs)
    torch.testing.assert_close(exact.double(), expected, atol=2e-5, rtol=1e-4)


def test_circuits_convert_both_ways_and_evaluate_as_the_rule_says(gqa):
    """An ungrouped circuit evaluates on the twin; grouped, a key/value edge is in when any copy is, so the
    grouped circuit and that circuit ungrouped again score the same, and a circuit whose copies go
    together scores the same in both graphs."""
    pairs = make_pairs(gqa)
    n_kv = gqa.spec.n_kv_heads
    ungrouped = Graph.from_model(gqa, ungrouped=True)
    attribute(gqa, ungrouped, pairs, method="eap", quiet=True)
    circuit = ungrouped.top_n(40)
    grouped = circuit.grouped(n_kv)
    with pytest.warns(CircuitsWarning, match="equal share"):
        back = grouped.ungrouped()
    f_grouped = evaluate(gqa, grouped, pairs).circuit
    assert torch.equal(back.grouped(n_kv).in_graph, grouped.in_graph)  # every copy goes with the others
    assert evaluate(gqa, back, pairs).circuit == pytest.approx(f_grouped, abs=1e-5)
    # the ungrouped circuit itself: a subset of its grouped form
    assert bool((circuit.grouped(n_kv).in_graph >= grouped.in_graph).all())
    assert evaluate(gqa, circuit, pairs).full == pytest.approx(evaluate(gqa, grouped, pairs).full, abs=1e-5)


def test_files_say_which_graph_they_hold(gqa, tmp_path):
    spec = gqa.spec
    pairs = make_pairs(gqa)
    ungrouped = Graph.from_model(gqa, ungrouped=True)
    attribute(gqa, ungrouped, pairs, method="eap", quiet=True)
    circuit = ungrouped.top_n(30)
    # EAP-IG writes its TransformerLens cfg (the model's key/value head count) with every query head's edges
    ours = tmp_path / "ours.json"
    circuit.to_json(ours)
    data = json.loads(ours.read_text())
    data["cfg"]["n_key_value_heads"] = spec.n_kv_heads
    eap_ig_file = tmp_path / "eap_ig.json"
    eap_ig_file.write_text(json.dumps(data))
    for path in (ours, eap_ig_file):
        read = Graph.from_json(path)
        assert read.spec.n_kv_heads == spec.n_heads and torch.equal(read.in_graph, circuit.in_graph)
        assert evaluate(gqa, read, pairs).circuit == pytest.approx(evaluate(gqa, circuit, pairs).circuit)
    # grouped: the kv spelling, read back grouped
    grouped = circuit.grouped(spec.n_kv_heads)
    grouped.to_json(tmp_path / "grouped.json")
    read = Graph.from_json(tmp_path / "grouped.json")
    assert read.spec.n_kv_heads == spec.n_kv_heads and torch.equal(read.in_graph, grouped.in_graph)
    # a grouped file of the older spelling (a{l}.h{g}<k>, every edge listed) is still read as grouped
    old = json.loads((tmp_path / "grouped.json").read_text())
    old["edges"] = {k.replace(".kv", ".h"): v for k, v in old["edges"].items()}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert torch.equal(Graph.from_json(tmp_path / "old.json").in_graph, grouped.in_graph)
    # ... but a partial one could be either
    old["edges"] = {k: v for k, v in old["edges"].items() if v["in_graph"]}
    (tmp_path / "partial.json").write_text(json.dumps(old))
    with pytest.raises(FileFormatError, match="could be EAP-IG's inputs of query heads"):
        Graph.from_json(tmp_path / "partial.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CircuitsWarning)
        assert Graph.from_model(gqa).ungrouped().n_edges == ungrouped.n_edges  # no scores: no warning


def test_an_eap_ig_circuit_file_for_smollm2_evaluates_here(smollm2, tmp_path):
    """A circuit file as EAP-IG writes one for SmolLM2 (its TransformerLens cfg, every edge of its
    ungrouped graph by EAP-IG's names, no sign stated) is read as the ungrouped graph and evaluated on
    the model; converted to the grouped graph by the rule (a key/value edge in when any copy is), a
    circuit whose copies go together scores the same."""
    from circuits import make_task

    spec = smollm2.spec
    names = sorted(eap_ig_edges(spec.n_layers, spec.n_heads))
    group = spec.n_heads // spec.n_kv_heads

    def kept(name: str) -> bool:  # a circuit of late layers, every key/value copy with its group
        src, dst = name.split("->")
        layer = int(dst[1 : dst.index(".")]) if dst.startswith("a") else int(dst[1:]) if dst[0] == "m" else 99
        return layer >= 20 and (src == "input" or src.startswith(("a2", "m2")) or dst == "logits")

    cfg = {"n_layers": spec.n_layers, "n_heads": spec.n_heads, "n_key_value_heads": spec.n_kv_heads}
    cfg |= {"d_model": spec.d_model, "d_head": spec.d_head, "d_mlp": spec.d_mlp, "parallel_attn_mlp": False}
    edges = {name: {"score": 0.0, "in_graph": kept(name)} for name in names}
    nodes = {n: {"in_graph": True} for n in {e.split("->")[0] for e in names} | {"logits"}}
    path = tmp_path / "eap_ig_smollm2.json"
    path.write_text(json.dumps({"cfg": cfg, "nodes": nodes, "edges": edges}))
    circuit = Graph.from_json(path)
    assert circuit.n_edges == 123_211 and circuit.spec.n_kv_heads == spec.n_heads
    assert group == 3
    pairs = make_task(smollm2, "ioi", 4, seed=0).pairs
    ungrouped = evaluate(smollm2, circuit, pairs)
    grouped = evaluate(smollm2, circuit.grouped(spec.n_kv_heads), pairs)
    assert circuit.n_in_graph > 100 and ungrouped.full == pytest.approx(grouped.full, rel=1e-5)
    assert ungrouped.circuit == pytest.approx(grouped.circuit, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize(
    ("model_type", "heads", "kv_heads"),
    [("qwen2", 7, 1), ("llama", 8, 2)],  # Qwen-2.5-0.5B's grouping (14 / 2), Llama-3.1-8B's (32 / 8)
)
def test_a_mib_submission_for_a_gqa_model_holds_mibs_edges_and_budgets(tmp_path, model_type, heads, kv_heads):
    from transformers import AutoConfig, AutoModelForCausalLM

    from circuits.evaluation.submissions import SUBMISSION_PERCENTAGES, write_circuits, write_importances

    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tiny_tokenizer()),
        hidden_size=8 * heads,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = load_model(AutoModelForCausalLM.from_config(config).eval(), tiny_tokenizer())
    graph = Graph.from_model(model, ungrouped=True)
    attribute(model, graph, make_pairs(model), method="eap", quiet=True)
    mib_edges = eap_ig_edges(2, heads)
    importances = json.loads(write_importances(graph, tmp_path / "scores", "ioi", model_type).read_text())
    assert set(importances["edges"]) == mib_edges
    for percent, path in zip(
        SUBMISSION_PERCENTAGES, write_circuits(graph, tmp_path / "circuits", "ioi", model_type)
    ):
        edges = json.loads(path.read_text())["edges"]
        assert set(edges) == mib_edges  # EAP-IG's names, every edge listed
        assert sum(e["in_graph"] for e in edges.values()) <= int(percent / 100 * len(mib_edges))
