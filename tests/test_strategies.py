"""Selection strategies under a budget (`circuits.selection.strategies`), checked against their definitions on
random scores: ratio selection's two limits and its split, pruning-aware filling, MIB's weighted count,
score ensembles."""

import pytest
import torch

from circuits import Graph
from circuits.errors import InputError
from circuits.models.hooked import ModelSpec
from circuits.selection.strategies import (
    ensemble_scores,
    filled_budget,
    mib_edge_weights,
    ratio_budget,
    ratio_selection,
    select,
    top_budget,
)

SPEC = ModelSpec(n_layers=3, n_heads=4, n_kv_heads=2, d_model=8, d_head=2, d_mlp=16)


def _graph(seed: int = 0, spec: ModelSpec = SPEC) -> Graph:
    graph = Graph(spec)
    graph.scores = torch.randn(graph.valid.shape, generator=torch.Generator().manual_seed(seed)) * graph.valid
    return graph


def _edges(circuit: Graph) -> torch.Tensor:
    return circuit.in_graph & circuit.valid


def test_ratio_limits_are_signed_and_absolute_selection():
    graph = _graph()
    ones = graph.valid.long()
    budget = 40
    signed = top_budget(graph, budget, absolute=False, prune=False, weights=ones)
    absolute = top_budget(graph, budget, absolute=True, prune=False, weights=ones)
    ratio = {p: _edges(ratio_budget(graph, budget, p, prune=False, weights=ones)) for p in (0.0, 0.5, 1.0)}
    assert torch.equal(ratio[0.0], _edges(absolute))
    assert int((-graph.scores[_edges(signed)] > 0).sum()) == budget  # enough helping edges
    assert torch.equal(ratio[1.0], _edges(signed))
    assert int(ratio[0.5].sum()) == budget
    helping = _edges(top_budget(graph, budget // 2, absolute=False, prune=False, weights=ones))
    assert bool((ratio[0.5] | helping).eq(ratio[0.5]).all())  # the best half of helpers is in
    weights = mib_edge_weights(graph)
    mixed = _edges(ratio_budget(graph, budget, 0.5, prune=False))
    assert int(weights[mixed].sum()) <= budget
    with pytest.raises(InputError, match="positive"):
        ratio_selection(1.5)


def test_filled_selection_uses_the_budget_pruning_frees():
    graph = _graph(1)
    graph.scores[1:] = graph.scores[1:].abs() * 0.01  # only the input's edges matter ...
    graph.scores[1 + SPEC.n_heads, :] = 10.0  # ... but m0's edges rank first, and m0 is fed nothing
    graph.scores *= graph.valid
    weights = graph.valid.long()
    for budget in (5, 20, 60):
        plain = graph.top_n(budget)
        filled = filled_budget(graph, budget, absolute=True, weights=weights)
        assert int(_edges(filled).sum()) <= budget
        assert int(_edges(filled).sum()) >= int(_edges(plain).sum())
    assert int(_edges(filled_budget(graph, 20, True, weights)).sum()) > int(_edges(graph.top_n(20)).sum())


def test_weighted_budget_counts_kv_edges_per_query_head():
    graph = _graph(2)
    weights = mib_edge_weights(graph)
    layer_k = graph.qkv_destinations(1, "k")
    block = weights[:, layer_k][graph.valid[:, layer_k]]
    assert block.numel() > 0 and bool((block == 2).all())
    ungrouped = Graph(ModelSpec(**{**SPEC.__dict__, "n_kv_heads": SPEC.n_heads}))
    assert int(weights.sum()) == ungrouped.n_edges
    for budget in (1, 7, 33, int(weights.sum())):
        circuit = top_budget(graph, budget, prune=False)
        assert int(weights[_edges(circuit)].sum()) <= budget
    with pytest.raises(InputError, match="greedy"):
        select(graph, 10, "greedy", weights=weights)
    with pytest.raises(InputError, match="unknown selection"):
        select(graph, 10, "best")  # type: ignore[arg-type]


def test_ensemble_normalises_each_method():
    a, b = _graph(3), _graph(4)
    b.scores *= 1000.0  # another method's scale
    mean = ensemble_scores([a, b])
    want = (a.scores / a.scores.abs().max() + b.scores / b.scores.abs().max()) / 2
    assert torch.allclose(mean.scores, want)
    assert torch.equal(
        ensemble_scores([a, b], "min").scores,
        torch.minimum(a.scores / a.scores.abs().max(), b.scores / b.scores.abs().max()) * a.valid,
    )
    assert torch.equal(a.scores, _graph(3).scores)  # inputs untouched
    with pytest.raises(InputError, match="same model"):
        ensemble_scores([a, _graph(0, ModelSpec(2, 4, 4, 8, 2, 16))])
