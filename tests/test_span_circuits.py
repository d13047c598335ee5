"""Position-aware circuits (SpanGraph): evaluation ablates span edges at their spans and crossing edges
inside attention; checked against the exact scores (themselves checked against the brute force), against
position-agnostic evaluation, and against a brute force of several crossing edges of one layer at once."""

import json

import pytest
import torch

from circuits import Graph, attribute, draw_span_circuit, evaluate
from circuits.errors import FileFormatError, GraphMismatchError
from circuits.span_graph import SpanGraph, concrete_edges, prune_dead
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


def test_top_n_ranks_span_and_crossing_edges_together(scored):
    _, _, _, graph = scored
    circuit = graph.top_n(20, prune=False)
    assert circuit.n_in_graph == 20
    chosen = torch.cat([circuit.scores[circuit.in_graph], circuit.crossing_scores[circuit.in_crossing]])
    left = torch.cat(
        [
            graph.scores[graph.valid & ~circuit.in_graph],
            graph.crossing_scores[graph.crossing_valid & ~circuit.in_crossing],
        ]
    )
    assert float(chosen.abs().min()) >= float(left.abs().max())
    assert bool(circuit.in_crossing.any()) and bool(circuit.in_graph.any())
    assert graph.n_in_graph == graph.n_edges  # the original is untouched


@pytest.mark.parametrize("n", [5, 30, 120])
def test_pruning_drops_only_edges_that_change_nothing(scored, n):
    model, pairs, spans, graph = scored
    loose = graph.top_n(n, prune=False)
    pruned = graph.top_n(n)
    assert bool((pruned.in_graph <= loose.in_graph).all()) and bool(
        (pruned.in_crossing <= loose.in_crossing).all()
    )
    again = pruned.copy()
    prune_dead(again)
    assert torch.equal(again.in_graph, pruned.in_graph) and torch.equal(again.in_crossing, pruned.in_crossing)
    before, after = (evaluate(model, c, pairs, spans=spans) for c in (loose, pruned))
    torch.testing.assert_close(after.per_example, before.per_example, atol=1e-5, rtol=0)
    if n == 120:
        assert pruned.n_in_graph < loose.n_in_graph  # something was dead


def test_concrete_edges_count_positions_as_peap_does(scored):
    model, _, spans, graph = scored
    circuit = graph.copy()
    circuit.in_graph[:] = False
    circuit.in_crossing[:] = False
    lengths = spans.lengths.double()  # [N, S]
    s = 1
    circuit.in_graph[s, 0, graph.graph.logits_destination] = True  # input -> logits at span s
    head = graph.graph.head_sources(1).start
    circuit.in_crossing[0, s, head, 0] = True  # keys of span 0 read at span s
    circuit.in_crossing[s, s, head, 1] = True  # values within span s
    expected = lengths[:, s] + lengths[:, 0] * lengths[:, s] + lengths[:, s] * (lengths[:, s] + 1) / 2
    assert circuit.concrete_edges(spans) == pytest.approx(float(expected.mean()))
    plain = Graph.from_model(model)
    plain.in_graph[:] = False
    plain.in_graph[0, plain.logits_destination] = True
    assert concrete_edges(plain, spans) == pytest.approx(float(lengths.sum(1).mean()))


def test_attached_pairs_carry_their_spans_into_slices(scored):
    model, pairs, spans, graph = scored
    attached = spans.attach(pairs)
    whole = evaluate(model, graph.top_n(10), attached)  # no spans= needed: the pairs carry them
    first, rest = (evaluate(model, graph.top_n(10), part) for part in (attached[:1], attached[1:]))
    torch.testing.assert_close(whole.per_example, torch.cat([first.per_example, rest.per_example]))


@pytest.mark.parametrize("circuit_only", [False, True])
def test_span_circuit_files_read_back(scored, tmp_path, circuit_only):
    _, _, _, graph = scored
    circuit = graph.top_n(25)
    path = tmp_path / "circuit.json"
    circuit.to_json(path, circuit_only=circuit_only)
    back = SpanGraph.from_json(path)
    assert back.names == circuit.names and back.metric == circuit.metric
    assert torch.equal(back.in_graph, circuit.in_graph) and torch.equal(back.in_crossing, circuit.in_crossing)
    kept = circuit.in_graph if circuit_only else circuit.valid
    torch.testing.assert_close(back.scores[kept], circuit.scores[kept])
    kept = circuit.in_crossing if circuit_only else circuit.crossing_valid
    torch.testing.assert_close(back.crossing_scores[kept], circuit.crossing_scores[kept])
    names = list(json.loads(path.read_text())["edges"])
    assert circuit_only or any(
        "<k>@" in name and name.split("->")[1].split("@")[0].startswith("a") for name in names
    )


def test_a_malformed_span_circuit_file_is_refused(scored, tmp_path):
    _, _, _, graph = scored
    path = tmp_path / "circuit.json"
    graph.top_n(5).to_json(path, circuit_only=True)
    data = json.loads(path.read_text())
    for bad, error in (("input->m0", FileFormatError), ("input@end->m0@s0", GraphMismatchError)):
        broken = dict(data, edges={bad: {"score": 1.0, "in_graph": True}})
        path.write_text(json.dumps(broken))
        with pytest.raises(error):
            SpanGraph.from_json(path)


def test_a_span_circuit_is_drawn_by_span_with_an_examples_tokens(scored, tmp_path):
    model, pairs, spans, graph = scored
    circuit = graph.top_n(40)
    assert bool(circuit.in_crossing.any())
    tokens = spans.tokens(model, pairs, 0)
    text = "".join(token for span in tokens for token in span)
    assert text == model.tokenizer.decode(pairs.clean[0, : int(pairs.lengths[0])].tolist())
    path = draw_span_circuit(circuit, tmp_path / "circuit.svg", tokens=tokens, max_edges=5)
    svg = path.read_text()  # matplotlib keeps each text as a comment beside its glyphs
    assert all(name in svg for name in spans.names) and f"5 of {circuit.n_in_graph}" in svg


def test_greedy_growth_starts_at_the_logits_and_stays_connected(scored):
    """PEAP's search: each edge added feeds a node already connected to the logits at the last span."""
    _, _, spans, graph = scored
    g = graph.graph
    first = graph.greedy(1, prune=False)
    end, logits = len(spans) - 1, g.logits_destination
    into_logits = graph.scores[end, :, logits].abs() * g.valid[:, logits]
    assert bool(first.in_graph[end, int(into_logits.argmax()), logits]) and first.n_in_graph == 1
    small, large = graph.greedy(15, prune=False), graph.greedy(60, prune=False)
    assert large.n_in_graph == 60
    assert bool((small.in_graph <= large.in_graph).all()) and bool(
        (small.in_crossing <= large.in_crossing).all()
    )
    # every chosen edge reaches ("dst", logits, end) through chosen edges
    successors: dict[tuple, set] = {}
    for s, u, v in large.in_graph.nonzero().tolist():
        successors.setdefault(("dst", v, s), set())
        for reader in g.readers(v):
            if reader != "logits":
                successors.setdefault(("src", g.src_index[reader], s), set())
        successors.setdefault(("src", u, s), set()).add(("dst", v, s))
    for a, b, h, letter in large.in_crossing.nonzero().tolist():
        kv = next(
            c
            for c in range(g.n_destinations)
            if g.sources[h] in g.readers(c) and Graph.qkv_letter(g.destinations[c]) == "kv"[letter]
        )
        successors.setdefault(("dst", kv, a), set()).add(("src", h, b))
    for (kind, index, span), targets in list(successors.items()):
        if kind == "dst":  # a q / MLP input feeds its reader at its span (k / v only through crossing edges)
            for reader in g.readers(index):
                if reader != "logits" and Graph.qkv_letter(g.destinations[index]) not in ("k", "v"):
                    targets.add(("src", g.src_index[reader], span))

    def reaches(node: tuple, seen: set) -> bool:
        if node == ("dst", logits, end):
            return True
        seen.add(node)
        return any(reaches(n, seen) for n in successors.get(node, ()) if n not in seen)

    for s, u, v in large.in_graph.nonzero().tolist():
        assert reaches(("src", u, s), set()), (s, u, v)


def test_the_complement_of_a_span_circuit_ablates_its_edges(scored):
    model, pairs, spans, graph = scored
    circuit = graph.top_n(30)
    inverse = graph.copy()
    inverse.in_graph = graph.valid & ~circuit.in_graph
    inverse.in_crossing = graph.crossing_valid & ~circuit.in_crossing
    complement = evaluate(model, circuit, pairs, spans=spans, complement=True)
    expected = evaluate(model, inverse, pairs, spans=spans)
    torch.testing.assert_close(complement.per_example, expected.per_example)
    assert complement.circuit != pytest.approx(evaluate(model, circuit, pairs, spans=spans).circuit)


def test_crossing_edges_are_not_ablated_where_the_pattern_cannot_be_edited():
    """A bridge that computes attention past its pattern hook would ignore the edit: refused, not wrong."""
    from circuits.errors import UnsupportedModelError
    from circuits.models.checks import _PROBED
    from circuits.testing import tiny_llama

    model = tiny_llama()
    _PROBED.setdefault(model, {})["pattern"] = "the attention pattern hook does not feed the heads"
    pairs = make_pairs(model)
    spans = Spans.from_differences(pairs)
    graph = SpanGraph.from_model(model, spans)
    circuit = graph.copy()
    circuit.in_crossing[:] = False
    with pytest.raises(UnsupportedModelError, match="pattern"):
        evaluate(model, circuit, pairs, spans=spans)
    kept = graph.copy()  # every crossing edge kept: no pattern edit needed
    kept.in_graph[:] = False
    assert bool(evaluate(model, kept, pairs, spans=spans).per_example.isfinite().all())


def test_signed_selection_takes_the_edges_that_help_most_first(scored):
    _, _, _, graph = scored
    circuit = graph.top_n(6, absolute=False, prune=False)
    chosen = torch.cat([graph.scores[circuit.in_graph], graph.crossing_scores[circuit.in_crossing]])
    left = torch.cat(
        [
            graph.scores[graph.valid & ~circuit.in_graph],
            graph.crossing_scores[graph.crossing_valid & ~circuit.in_crossing],
        ]
    )
    assert float(chosen.max()) <= float(left.min()) and float(chosen.max()) < 0  # most negative: helps M


def test_faithfulness_curves_and_mib_scores_of_a_span_graph(scored):
    from circuits.evaluation.curves import mib_scores

    model, pairs, spans, graph = scored
    scores = mib_scores(
        model, graph, pairs, spans=spans, percentages=(1.0, 10.0, 100.0), resamples=0, quiet=True
    )
    for curve in (scores.signed, scores.absolute):
        assert [p.percent for p in curve.points] == [1.0, 10.0, 100.0]
        assert curve.points[-1].faithfulness == pytest.approx(1.0, abs=1e-4)  # every edge kept
    budget = int(0.1 * graph.n_edges)
    direct = evaluate(model, graph.top_n(budget), pairs, spans=spans)
    assert scores.absolute.points[1].faithfulness == pytest.approx(direct.faithfulness, abs=1e-6)
    assert scores.cpr == pytest.approx(scores.signed.area_under) and scores.cmd >= 0
