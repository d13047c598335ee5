"""Scores per span (position-aware circuits): span edge scores sum over spans to the position-summed
scores of the same method, and exact patching of one edge (node) at one span's positions matches the
brute force patching that destination input there only, on both tiny layouts (Llama's grouped-query)."""

import pytest
import torch

from circuits import Graph, attribute, evaluate
from circuits.errors import InputError
from circuits.span_graph import SpanGraph
from circuits.spans import Spans
from tests import brute_force
from tests.pairs import make_pairs

pytestmark = pytest.mark.filterwarnings("ignore:IG completeness")  # 3 IG steps: the sums are the point

GRADIENT_METHODS = ["eap", "eap-ig-inputs", "eap-ig-activations", "clean-corrupted", "relp"]


def _scored(model, method, level="edge", **settings):
    pairs = make_pairs(model)
    spans = Spans.from_differences(pairs)
    per_span = SpanGraph.from_model(model, spans)
    split = attribute(model, per_span, pairs, method=method, level=level, spans=spans, quiet=True, **settings)
    summed = attribute(
        model, Graph.from_model(model), pairs, method=method, level=level, quiet=True, **settings
    )
    return pairs, spans, per_span, split, summed


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_span_edge_scores_sum_to_the_position_summed_ones(tiny, method):
    _, spans, per_span, split, summed = _scored(tiny, method, ig_steps=3)
    assert split.span_names == spans.names and split.span_edge_scores is not None
    assert split.span_edge_scores.shape == (len(spans), *summed.edge_scores.shape)
    scale = float(summed.edge_scores.abs().max())
    torch.testing.assert_close(split.span_edge_scores.sum(0), summed.edge_scores, atol=1e-6 * scale, rtol=0)
    torch.testing.assert_close(split.edge_scores, summed.edge_scores, atol=1e-6 * scale, rtol=0)
    torch.testing.assert_close(per_span.scores, split.span_edge_scores)
    crossing = split.crossing_scores  # every gradient method scores the crossing edges too
    assert crossing is not None and bool(crossing.isfinite().all()) and bool(crossing.abs().sum() > 0)
    # the spans are not all alike: the scores are really split
    assert float(split.span_edge_scores.abs().sum((1, 2)).min()) < 0.5 * float(
        split.span_edge_scores.abs().sum((1, 2)).max()
    )


def test_span_edge_scores_sum_on_every_layout(layout):
    _, _, _, split, summed = _scored(layout, "eap")
    scale = float(summed.edge_scores.abs().max())
    torch.testing.assert_close(split.span_edge_scores.sum(0), summed.edge_scores, atol=1e-6 * scale, rtol=0)


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs"])
def test_span_node_scores_sum_to_the_position_summed_ones(tiny, method):
    _, spans, _, split, summed = _scored(tiny, method, level="node", ig_steps=3)
    assert split.span_node_scores is not None and split.span_node_scores.shape == (
        len(spans),
        summed.node_scores.shape[0],
    )
    scale = float(summed.node_scores.abs().max())
    torch.testing.assert_close(split.span_node_scores.sum(0), summed.node_scores, atol=1e-6 * scale, rtol=0)


def test_span_eap_matches_the_brute_force_gradient_per_span(tiny):
    pairs, spans, _, split, _ = _scored(tiny, "eap")
    graph = Graph.from_model(tiny)
    clean = brute_force.source_outputs(tiny, pairs.clean)
    corrupted = brute_force.source_outputs(tiny, pairs.corrupted)
    grads = brute_force.destination_grads(tiny, graph, pairs)
    for s, name in enumerate(spans.names):
        keep = spans.positions(name)[..., None].to(tiny.dtype)
        deltas = {src: (corrupted[src] - clean[src]) * keep for src in clean}
        expected = brute_force.gradient_scores(graph, deltas, grads, model=tiny)
        torch.testing.assert_close(split.span_edge_scores[s].double(), expected, atol=1e-6, rtol=1e-4)


def test_exact_span_edges_match_the_brute_force(tiny):
    pairs, spans, _, split, _ = _scored(tiny, "exact")
    graph = Graph.from_model(tiny)
    scale = float(split.span_edge_scores.abs().max())
    for s, name in enumerate(spans.names):
        expected = brute_force.exact_scores(tiny, graph, pairs, spans.positions(name))
        torch.testing.assert_close(split.span_edge_scores[s].double(), expected, atol=1e-4 * scale, rtol=0)


def test_exact_span_nodes_match_the_brute_force(tiny):
    pairs, spans, _, split, _ = _scored(tiny, "exact", level="node")
    graph = Graph.from_model(tiny)
    scale = float(split.span_node_scores.abs().max())
    for s, name in enumerate(spans.names):
        expected = brute_force.exact_node_scores(tiny, graph, pairs, spans.positions(name))
        torch.testing.assert_close(split.span_node_scores[s].double(), expected, atol=1e-4 * scale, rtol=0)


def test_spans_of_another_schema_or_a_plain_graph_are_refused(tiny):
    pairs = make_pairs(tiny)
    spans = Spans.from_differences(pairs)
    other = SpanGraph(Graph.from_model(tiny), ("x", "end"))
    with pytest.raises(InputError, match="schema"):
        attribute(tiny, other, pairs, method="eap", spans=spans, quiet=True)
    with pytest.raises(InputError, match="SpanGraph"):
        attribute(tiny, Graph.from_model(tiny), pairs, method="eap", spans=spans, quiet=True)
    with pytest.raises(InputError, match="give the prompts' spans"):
        attribute(tiny, SpanGraph.from_model(tiny, spans), pairs, method="eap", quiet=True)


@pytest.mark.parametrize("method", ["exact", "eap"])
def test_crossing_edges_match_the_brute_force(tiny, method):
    """Exact: the head's output with one span's keys (values) from the corrupted run, at one span's
    queries; EAP: PEAP's score, that change dotted with the gradient there. Llama's 4 query heads share 2
    key / value heads: patching a kv head's keys moves each of its query heads, read apart."""
    pairs = make_pairs(tiny)
    spans = Spans.from_differences(pairs)
    graph = SpanGraph.from_model(tiny, spans)
    got = attribute(tiny, graph, pairs, method=method, spans=spans, quiet=True).crossing_scores
    assert got is not None and got.shape == (len(spans), len(spans), graph.graph.n_sources, 2)
    torch.testing.assert_close(graph.crossing_scores, got)
    assert not bool(got[~graph.crossing_valid].any())  # keys after the query span, or no head: no edge
    expected = brute_force.crossing_scores(tiny, pairs, spans.index, len(spans))
    column = 0 if method == "exact" else 1
    reference = torch.zeros_like(got, dtype=torch.float64)
    for (a, b, layer, head, letter), values in expected.items():
        reference[a, b, graph.graph.head_sources(layer).start + head, letter] = values[column]
    scale = float(reference.abs().max())
    assert scale > 1e-4
    torch.testing.assert_close(got.double(), reference, atol=1e-4 * scale, rtol=0)


def test_mean_ablation_per_span_uses_each_spans_mean(tiny):
    """Mean ablation of a SpanGraph: each source's mean over the reference positions of the same span
    (prompts of one schema, of any lengths); EAP per span against the brute-force gradient."""
    pairs = make_pairs(tiny)
    spans = Spans.from_differences(pairs)
    attached = spans.attach(pairs)
    graph = SpanGraph.from_model(tiny, spans)
    split = attribute(tiny, graph, attached, method="eap", ablation="mean", quiet=True)
    plain = Graph.from_model(tiny)
    clean = brute_force.source_outputs(tiny, pairs.clean)
    index = spans.index
    means = {
        src: torch.stack([value[index == s].mean(0) for s in range(len(spans))])
        for src, value in clean.items()
    }
    deltas = {
        src: (means[src][index.clamp(min=0)] - value) * (index >= 0)[..., None]
        for src, value in clean.items()
    }
    grads = brute_force.destination_grads(tiny, plain, pairs)
    for s, name in enumerate(spans.names):
        keep = spans.positions(name)[..., None].to(tiny.dtype)
        expected = brute_force.gradient_scores(
            plain, {k: v * keep for k, v in deltas.items()}, grads, model=tiny
        )
        torch.testing.assert_close(split.span_edge_scores[s].double(), expected, atol=1e-6, rtol=1e-4)
    result = evaluate(tiny, graph.top_n(20), attached, ablation="mean")  # evaluation takes the same means
    assert result.full != result.empty


def test_atp_star_per_span_fixes_q_and_k_edges_at_their_span(tiny):
    """AtP*'s QK fix per span: a q / k span edge moves the queries (keys) at its span's positions only and
    the softmax is recomputed exactly (the brute force reads the patched pattern); other edges are EAP's."""
    pairs, spans, _, split, _ = _scored(tiny, "atp*")
    eap = attribute(tiny, SpanGraph.from_model(tiny, spans), pairs, method="eap", spans=spans, quiet=True)
    plain = Graph.from_model(tiny)
    for s, name in enumerate(spans.names):
        reference = brute_force.qk_fix_scores(tiny, plain, pairs, spans.positions(name))
        scale = float(split.span_edge_scores.abs().max())  # the bos span moves nothing: its scores are ~0
        worst = max(
            abs(float(split.span_edge_scores[s][plain.edge_index(e)]) - v) for e, v in reference.items()
        )
        assert worst < 1e-4 * scale, name
        others = torch.ones_like(plain.valid)
        for e in reference:
            others[plain.edge_index(e)] = False
        torch.testing.assert_close(
            split.span_edge_scores[s][others], eap.span_edge_scores[s][others], rtol=0, atol=1e-7
        )
    assert split.crossing_scores is not None
    torch.testing.assert_close(split.crossing_scores, eap.crossing_scores)  # PEAP's, from the same gradient


def test_graddrop_per_span_leaves_one_path_where_the_model_has_two_layers(llama):
    """As for GradDrop over positions (tests/attribution/test_atp_star.py), per span: a last-layer
    source's GradDrop at span s is the mean over examples of |its AtP score at s|, layer 0's MLP's the
    mean |its direct edge to the logits at s|."""
    pairs = make_pairs(llama)
    spans = Spans.from_differences(pairs)
    graph = SpanGraph.from_model(llama, spans)
    scores = attribute(llama, graph, pairs, method="atp*", level="node", spans=spans, quiet=True)
    assert scores.span_node_scores is not None
    attached = spans.attach(pairs)
    each = []
    for i in range(len(pairs)):
        one = SpanGraph.from_model(llama, spans)
        attribute(llama, one, attached[i : i + 1], method="eap", quiet=True)
        each.append(one.scores)
    per_example = torch.stack(each)  # [b, S, n_src, n_dst]
    g = graph.graph
    last = [*range(g.head_sources(1).start, g.head_sources(1).stop), g.mlp_source(1)]
    want_last = per_example.sum(3)[:, :, last].abs().mean(0)
    want_first = per_example[:, :, g.mlp_source(0), g.logits_destination].abs().mean(0)
    torch.testing.assert_close(scores.span_node_scores[:, last], want_last, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores.span_node_scores[:, g.mlp_source(0)], want_first, rtol=1e-4, atol=1e-7)
