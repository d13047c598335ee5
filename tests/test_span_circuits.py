"""Position-aware circuits (SpanGraph): evaluation ablates span edges at their spans and crossing edges
inside attention; checked against the exact scores (themselves checked against the brute force), against
position-agnostic evaluation, and against a brute force of several crossing edges of one layer at once."""

import pytest
import torch

from circuits import Graph, attribute, evaluate
from circuits.span_graph import SpanGraph
from circuits.spans import Spans
from tests import brute_force
from tests.pairs import make_pairs


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def scored(request):
    model = request.getfixturevalue(request.param)
    pairs = make_pairs(model)
    spans = Spans.from_differences(pairs)
    graph = SpanGraph.from_model(model, spans)
    attribute(model, graph, pairs, method="exact", spans=spans, quiet=True)
    return model, pairs, spans, graph


def test_the_full_and_the_empty_circuit_are_the_clean_and_the_corrupted_runs(scored):
    model, pairs, spans, graph = scored
    result = evaluate(model, graph, pairs, spans=spans)
    clean = brute_force.metric(model, pairs).mean()
    corrupted = brute_force.metric(model, pairs, ids=pairs.corrupted).mean()
    assert result.circuit == pytest.approx(float(clean), abs=1e-5)
    assert result.full == pytest.approx(float(clean), abs=1e-5)
    assert result.empty == pytest.approx(float(corrupted), abs=1e-5)


def test_one_edge_removed_costs_its_exact_score(scored):
    model, pairs, spans, graph = scored
    s, u, v = torch.unravel_index(graph.scores.abs().argmax(), graph.scores.shape)
    one_span_edge = graph.copy()
    one_span_edge.in_graph[s, u, v] = False
    a, b, h, letter = torch.unravel_index(graph.crossing_scores.abs().argmax(), graph.crossing_scores.shape)
    one_crossing = graph.copy()
    one_crossing.in_crossing[a, b, h, letter] = False
    results = [evaluate(model, c, pairs, spans=spans) for c in (one_span_edge, one_crossing)]
    for result, score in zip(results, (graph.scores[s, u, v], graph.crossing_scores[a, b, h, letter])):
        assert abs(float(score)) > 1e-4
        assert result.circuit - result.full == pytest.approx(float(score), abs=1e-5)


def test_a_circuit_the_same_at_every_span_is_the_position_agnostic_circuit(scored):
    model, pairs, spans, graph = scored
    plain = Graph.from_model(model).with_scores(graph.scores.sum(0)).top_n(12, prune=False)
    per_span = graph.copy()
    per_span.in_graph = plain.in_graph.expand_as(per_span.in_graph).clone()
    assert torch.equal(per_span.in_crossing, per_span.crossing_valid)  # every crossing edge kept
    expected = evaluate(model, plain, pairs)
    got = evaluate(model, per_span, pairs, spans=spans)
    assert got.circuit == pytest.approx(expected.circuit, abs=1e-5)
    torch.testing.assert_close(got.per_example, expected.per_example, atol=1e-5, rtol=0)


def test_several_crossing_edges_of_a_layer_match_the_brute_force(scored):
    """Heads of one key / value group keep different key spans (Llama: 4 query heads, 2 kv heads)."""
    model, pairs, spans, graph = scored
    layer = 1
    heads = graph.graph.head_sources(layer)
    generator = torch.Generator().manual_seed(0)
    valid = graph.crossing_valid[:, :, heads]  # [S, S, H, 2]
    drop = valid & (torch.rand(valid.shape, generator=generator) < 0.4)
    circuit = graph.copy()
    circuit.in_crossing[:, :, heads] &= ~drop
    removed = {tuple(int(i) for i in index) for index in drop.nonzero()}
    assert len({h for _, _, h, _ in removed}) > 1 and len({a for a, _, _, _ in removed}) > 1
    expected = brute_force.without_crossing_edges(model, pairs, spans.index, layer, removed)
    got = evaluate(model, circuit, pairs, spans=spans)
    torch.testing.assert_close(got.per_example, expected.float(), atol=1e-5, rtol=1e-4)
