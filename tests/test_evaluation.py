"""Circuit evaluation against plain runs and exact patching; faithfulness curves and MIB areas."""

import pytest
import torch

from circuits import Graph, attribute, evaluate, evaluate_many, head_patching
from circuits.errors import InputError
from circuits.evaluation.curves import CurvePoint, FaithfulnessCurve, faithfulness_curve, mib_scores
from circuits.metrics import logit_diff
from circuits.sources import source_means
from tests.pairs import make_pairs


def plain_metric(model, pairs, ids):
    with torch.no_grad():
        clean = model(pairs.clean, pairs.attention_mask)
        logits = model(ids, pairs.attention_mask)
    return logit_diff(logits, pairs, clean)


def test_full_and_empty_circuits_reproduce_clean_and_corrupted_runs(layout):
    tiny = layout
    pairs = make_pairs(tiny)
    graph = Graph.from_model(tiny)
    result = evaluate(tiny, graph, pairs, batch_size=2)
    clean, corrupted = plain_metric(tiny, pairs, pairs.clean), plain_metric(tiny, pairs, pairs.corrupted)
    torch.testing.assert_close(result.per_example, clean, atol=1e-4, rtol=1e-4)
    assert result.full == pytest.approx(float(clean.mean()), abs=1e-4)
    assert result.empty == pytest.approx(float(corrupted.mean()), abs=1e-4)
    assert result.faithfulness == pytest.approx(1.0, abs=1e-4)
    empty = graph.copy()
    empty.in_graph.zero_()
    assert evaluate(tiny, empty, pairs).circuit == pytest.approx(result.empty, abs=1e-4)
    assert evaluate(tiny, graph, pairs, complement=True).circuit == pytest.approx(result.empty, abs=1e-4)


def test_one_edge_removed_equals_exact_score(llama):
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    exact = attribute(llama, graph, pairs, method="exact", quiet=True).edge_scores
    before = graph.in_graph.clone()
    for name in ["input->a0.h1<q>", "a0.h2->a1.kv0<v>", "m0->logits", "a1.h3->logits"]:
        circuit = graph.copy()
        circuit.in_graph[graph.edge_index(name)] = False
        result = evaluate(llama, circuit, pairs)
        assert result.circuit - result.full == pytest.approx(float(exact[graph.edge_index(name)]), abs=1e-4)
    assert torch.equal(graph.in_graph, before)  # the caller's graph is never modified


def test_mean_ablation_uses_a_mean_per_node_and_aligned_position(llama):
    """Prompts of different lengths: the value at a position is the mean, over the reference prompts that
    reach it, of the output at the same distance from the last token (never a mean pooled over positions),
    computed here from the hooks one prompt at a time."""
    pairs = make_pairs(llama)
    assert len(set(pairs.lengths.tolist())) > 1
    graph = Graph.from_model(llama)
    values = source_means(llama, graph, pairs, "mean").for_pairs(pairs)  # [N, P, n_sources, d]
    names = [llama.mlp_out_hook(0), llama.head_z_hook(1)]
    outputs = []  # per prompt: (mlp0 [L, d], heads of layer 1 [L, n_heads, d])
    for i in range(len(pairs)):
        with torch.no_grad(), llama.capture(names, clone=True) as captured:
            llama(pairs.clean[i : i + 1, : int(pairs.lengths[i])])
        captured = {n: captured[n][0] for n in names}
        z = captured[names[1]].reshape(-1, llama.spec.n_heads, llama.spec.d_head)
        outputs.append((captured[names[0]], torch.einsum("tnh,nhd->tnd", z, llama.W_O(1))))
    for i in range(len(pairs)):
        length = int(pairs.lengths[i])
        for p in (0, length - 1, length - 4):
            back = length - 1 - p  # start tokens are matched from the start, the rest from the end
            start = p < pairs.start_tokens
            index = p if start else -1 - back
            reach = [o for o in outputs if start or o[0].shape[0] - pairs.start_tokens > back]
            mlp0 = torch.stack([o[0][index] for o in reach]).mean(0)
            heads1 = torch.stack([o[1][index] for o in reach]).mean(0)
            torch.testing.assert_close(values[i, p, graph.mlp_source(0)], mlp0, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values[i, p, graph.head_sources(1)], heads1, atol=1e-5, rtol=1e-5)
        assert not bool(values[i, length:].any())  # padding
    assert not torch.allclose(
        values[0, -1, graph.head_sources(1)][0], values[0, -1, graph.head_sources(1)][1]
    )


def test_mean_ablation_refuses_prompts_longer_than_every_reference(llama):
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    short = pairs[2:]
    with pytest.raises(InputError, match="no reference prompt has more than"):
        evaluate(llama, graph, pairs, ablation="mean", reference=short)


def test_areas_of_a_hand_made_curve():
    curve = FaithfulnessCurve("hand", absolute=False, full=2.0, empty=0.0)
    for fraction, f in [(0.001, 0.2), (0.01, 0.6), (0.1, 1.2), (1.0, 1.0)]:
        curve.points.append(CurvePoint(fraction * 100, 0, fraction, 2 * f, f))
    # trapezoids: 0.009 * 0.4 + 0.09 * 0.9 + 0.9 * 1.1
    assert curve.area_under == pytest.approx(0.0036 + 0.081 + 0.99)
    # |1 - f| = 0.8, 0.4, 0.2, 0: 0.009 * 0.6 + 0.09 * 0.3 + 0.9 * 0.1
    assert curve.area_from_one == pytest.approx(0.0054 + 0.027 + 0.09)


def test_curves_on_a_tiny_model(llama):
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    attribute(llama, graph, pairs, method="eap-ig-inputs", quiet=True)
    scores = mib_scores(llama, graph, pairs, percentages=(10, 50, 100), quiet=True)
    for curve in (scores.signed, scores.absolute):
        assert [p.percent for p in curve.points] == [10, 50, 100]
        assert curve.points[-1].n_edges == graph.n_edges
        assert curve.points[-1].faithfulness == pytest.approx(1.0, abs=1e-4)
        assert all(p.n_edges <= round(p.percent / 100 * graph.n_edges) for p in curve.points)
    assert scores.cpr == pytest.approx(scores.signed.area_under)
    assert scores.cmd == pytest.approx(scores.absolute.area_from_one)
    random = faithfulness_curve(llama, graph, pairs, selection="random", percentages=(10, 100), quiet=True)
    assert random.points[-1].faithfulness == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="ascending"):
        faithfulness_curve(llama, graph, pairs, percentages=(50, 10))


def test_drawings(llama, tmp_path):
    from circuits.pictures.drawing import draw_circuit, plot_curves

    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    attribute(llama, graph, pairs, method="eap", quiet=True)
    circuit = graph.top_n(20)
    svg = draw_circuit(circuit, tmp_path / "circuit.svg")
    assert svg.read_text().count("<path") >= circuit.n_in_graph  # one arrow at least per edge
    png = draw_circuit(circuit, tmp_path / "circuit.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    curve = faithfulness_curve(llama, graph, pairs, percentages=(10, 100), quiet=True)
    assert plot_curves([curve], tmp_path / "curve.png").stat().st_size > 0
    empty = graph.copy()
    empty.in_graph.zero_()
    with pytest.raises(ValueError, match="no edges"):
        draw_circuit(empty, tmp_path / "empty.svg")


def test_drawing_keeps_the_largest_edges(llama, tmp_path):
    from circuits.pictures.drawing import draw_circuit
    from circuits.pictures.layout import largest_edges

    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    attribute(llama, graph, pairs, method="eap", quiet=True)
    circuit = graph.top_n(80)
    drawn = largest_edges(circuit, 25)
    assert int(drawn.sum()) == 25 and bool((drawn <= circuit.in_graph).all())
    kept, left_out = (
        circuit.scores[drawn].abs(),
        circuit.scores[circuit.in_graph & circuit.valid & ~drawn].abs(),
    )
    assert float(kept.min()) >= float(left_out.max())
    assert torch.equal(largest_edges(circuit, None), circuit.in_graph & circuit.valid)
    text = draw_circuit(circuit, tmp_path / "c.svg", max_edges=25).read_text()
    assert text.count("<path") >= 25
    with pytest.raises(ValueError, match="max_edges"):
        draw_circuit(circuit, tmp_path / "bad.svg", max_edges=0)


def test_drawing_every_block_layout(layout, tmp_path):
    from circuits.pictures.drawing import draw_circuit

    pairs = make_pairs(layout)
    graph = Graph.from_model(layout)
    attribute(layout, graph, pairs, method="eap", quiet=True)
    circuit = graph.top_n(12)
    text = draw_circuit(circuit, tmp_path / "circuit.svg").read_text()
    assert text.count("<path") >= circuit.n_in_graph


@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
def test_shared_mask_path_equals_per_row_path(layout, density):
    from circuits.intervention import forward_with_ablation

    tiny = layout
    pairs = make_pairs(tiny)
    graph = Graph.from_model(tiny)
    gen = torch.Generator().manual_seed(1)
    mask = (torch.rand(graph.valid.shape, generator=gen) < density) & graph.valid
    acts = torch.randn(len(pairs), pairs.n_positions, graph.n_sources, tiny.spec.d_model, generator=gen)
    shared = forward_with_ablation(tiny, graph, pairs.clean, pairs.attention_mask, acts, mask)
    rows = mask.expand(len(pairs), -1, -1)
    per_row = forward_with_ablation(tiny, graph, pairs.clean, pairs.attention_mask, acts, rows)
    torch.testing.assert_close(shared, per_row, atol=1e-4, rtol=1e-4)


def test_node_ablation_equals_ablating_every_outgoing_edge(layout):
    from circuits.intervention import forward_with_ablation, forward_with_node_ablation

    tiny = layout
    pairs = make_pairs(tiny)
    graph = Graph.from_model(tiny)
    b = len(pairs)
    nodes = torch.tensor(
        [0, graph.head_sources(0).start + 1, graph.mlp_source(0), graph.head_sources(1).start]
    )
    acts = torch.randn(
        b, pairs.n_positions, graph.n_sources, tiny.spec.d_model, generator=torch.Generator().manual_seed(2)
    )
    rows = nodes.repeat_interleave(b)
    ids, mask = pairs.clean.repeat(len(nodes), 1), pairs.attention_mask.repeat(len(nodes), 1)
    fast = forward_with_node_ablation(tiny, graph, ids, mask, acts, rows)
    edge_masks = torch.zeros(len(rows), graph.n_sources, graph.n_destinations, dtype=torch.bool)
    edge_masks[torch.arange(len(rows)), rows] = graph.valid[rows]
    torch.testing.assert_close(
        fast, forward_with_ablation(tiny, graph, ids, mask, acts, edge_masks), atol=1e-4, rtol=1e-4
    )


def test_the_pairs_carry_their_tasks_metric(llama):
    """A task's pairs are scored with the task's metric wherever they go, unless another is given: the
    quick-start pattern `evaluate(model, circuit, task.pairs)` no longer falls back to logit difference."""
    from circuits.task import TaskPairs

    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    attribute(llama, graph, pairs, method="eap", quiet=True)
    circuit = graph.top_n(20)
    task = TaskPairs("t", pairs, "prob_diff", len(pairs), 0)
    assert task.pairs.metric == "prob_diff" and pairs.metric is None  # the caller's pairs are not changed
    assert (
        task.pairs[:2].metric == "prob_diff" and task.pairs.take(torch.tensor([0, 0])).metric == "prob_diff"
    )
    carried, explicit = evaluate(llama, circuit, task.pairs), evaluate(llama, circuit, pairs, "prob_diff")
    default = evaluate(llama, circuit, pairs)
    assert (carried.full, carried.circuit) == (explicit.full, explicit.circuit)
    assert carried.full != default.full
    assert evaluate(llama, circuit, task.pairs, "logit_diff").full == default.full  # an explicit metric wins
    scored = attribute(llama, Graph.from_model(llama), task.pairs, method="eap", quiet=True)
    named = attribute(llama, Graph.from_model(llama), pairs, "prob_diff", method="eap", quiet=True)
    assert scored.metric_clean == named.metric_clean and torch.equal(scored.edge_scores, named.edge_scores)
    # the task itself is accepted wherever pairs are
    assert evaluate(llama, circuit, task).circuit == carried.circuit
    assert evaluate_many(llama, [circuit], task)[0].full == carried.full
    curve = faithfulness_curve(llama, graph, task, percentages=(10, 100))
    assert curve.full == carried.full
    assert mib_scores(llama, graph, task, percentages=(10, 100), resamples=0).signed.full == carried.full
    by_task = Graph.from_model(llama)
    assert torch.equal(
        attribute(llama, by_task, task, method="eap", quiet=True).edge_scores, named.edge_scores
    )
    assert head_patching(llama, task, quiet=True).shape == (llama.spec.n_layers, llama.spec.n_heads)


def test_circuit_files_record_the_metric_of_their_scores(llama, tmp_path):
    graph = Graph.from_model(llama)
    attribute(llama, graph, make_pairs(llama), "prob_diff", method="eap", quiet=True)
    assert graph.metric == "prob_diff" and graph.top_n(10).metric == "prob_diff"
    graph.to_json(tmp_path / "c.json")
    graph.to_pt(tmp_path / "c.pt")
    assert Graph.from_json(tmp_path / "c.json").metric == "prob_diff"
    assert Graph.from_pt(tmp_path / "c.pt").metric == "prob_diff"
    assert Graph.from_model(llama).metric is None
