"""Refinement at the circuit's operating point: the fractional-ablation forward against the exact one,
the mask gradient against EAP (at the full model) and central finite differences (at a circuit), and
the local search against its own objective."""

import pytest
import torch

from circuits import Graph, attribute, evaluate
from circuits.evaluation import ablated_outputs
from circuits.evaluation.curves import faithfulness_curve
from circuits.evaluation.refinement import mask_gradient, refine, refined_selection
from circuits.intervention import (
    ablation_gradient,
    forward_with_ablation,
    forward_with_weighted_ablation,
)
from circuits.metrics import logit_diff
from circuits.selection.strategies import mib_edge_weights
from tests.pairs import make_pairs


def _random_circuit(graph: Graph, share: float, seed: int = 0) -> Graph:
    circuit = graph.copy()
    chosen = torch.rand(graph.valid.shape, generator=torch.Generator().manual_seed(seed)) < share
    circuit.in_graph = chosen & graph.valid
    return circuit


def test_whole_weights_reproduce_the_exact_ablated_forward(layout):
    pairs = make_pairs(layout)
    graph = Graph.from_model(layout)
    circuit = _random_circuit(graph, 0.4)
    ablated, _, _ = ablated_outputs(layout, graph, pairs, None)
    ablate = graph.valid & ~circuit.in_graph
    exact = forward_with_ablation(layout, graph, pairs.clean, pairs.attention_mask, ablated, ablate)
    with torch.no_grad():
        weighted = forward_with_weighted_ablation(
            layout, graph, pairs.clean, pairs.attention_mask, ablated, ablate.float()
        )
    torch.testing.assert_close(weighted, exact, atol=1e-4, rtol=1e-4)


def test_ablation_gradient_equals_autograd_through_the_weighted_forward(layout):
    """The analytic gradient (sparse sums, weights without grad) against autograd with respect to the
    weights of the dense weighted forward, at a circuit's 0/1 weights."""
    pairs = make_pairs(layout)
    graph = Graph.from_model(layout)
    circuit = _random_circuit(graph, 0.3, seed=2)
    ablated, _, _ = ablated_outputs(layout, graph, pairs, None)
    ablate = graph.valid & ~circuit.in_graph
    with torch.no_grad():
        clean = layout(pairs.clean, pairs.attention_mask)

    def measure(logits):
        return logit_diff(logits, pairs, clean)

    _, analytic = ablation_gradient(
        layout, graph, pairs.clean, pairs.attention_mask, ablated, ablate, measure
    )
    weights = ablate.float().requires_grad_(True)
    with torch.enable_grad():
        logits = forward_with_weighted_ablation(
            layout, graph, pairs.clean, pairs.attention_mask, ablated, weights
        )
        measure(logits).sum().backward()
    assert weights.grad is not None
    torch.testing.assert_close(analytic.float(), weights.grad * graph.valid, atol=1e-4, rtol=1e-3)


def test_mask_gradient_at_the_full_model_is_minus_eap(layout):
    pairs = make_pairs(layout)
    graph = Graph.from_model(layout)
    eap = attribute(layout, graph, pairs, method="eap", quiet=True).edge_scores
    assert eap is not None
    at = mask_gradient(layout, graph, pairs, batch_size=2)
    full = evaluate(layout, graph, pairs).full
    assert at.circuit == pytest.approx(full, abs=1e-5) and at.full == pytest.approx(full, abs=1e-5)
    torch.testing.assert_close(at.grad.float(), -eap, atol=1e-4, rtol=1e-3)


def test_mask_gradient_matches_finite_differences_inside_a_circuit(llama):
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    circuit = _random_circuit(graph, 0.5, seed=1)
    at = mask_gradient(llama, circuit, pairs)
    assert at.circuit == pytest.approx(evaluate(llama, circuit, pairs).circuit, abs=1e-5)
    grad = at.grad
    ablated, _, _ = ablated_outputs(llama, graph, pairs, None)
    with torch.no_grad():
        clean = llama(pairs.clean, pairs.attention_mask)
    keep = (circuit.in_graph & graph.valid).double()
    top = [
        *grad.abs().flatten().argsort(descending=True)[:4].tolist(),
        int(graph.valid.flatten().nonzero()[0]),
    ]
    eps = 1e-2
    for flat in top:
        values = []
        for sign in (1, -1):
            k = keep.clone().flatten()
            k[flat] += sign * eps
            with torch.no_grad():
                logits = forward_with_weighted_ablation(
                    llama,
                    graph,
                    pairs.clean,
                    pairs.attention_mask,
                    ablated,
                    (1 - k.reshape(keep.shape)).float(),
                )
            values.append(float(logit_diff(logits, pairs, clean).double().mean()))
        fd = (values[0] - values[1]) / (2 * eps)
        assert float(grad.flatten()[flat]) == pytest.approx(fd, abs=2e-3, rel=2e-2), flat


def _objective(model, circuit, pairs, absolute, full):
    mean = evaluate(model, circuit, pairs).circuit
    return -abs(mean - full) if absolute else mean


@pytest.mark.parametrize("absolute", [False, True])
def test_refinement_improves_a_poor_start_within_the_budget(llama, absolute):
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    attribute(llama, graph, pairs, method="eap", quiet=True)
    full = evaluate(llama, graph, pairs).full
    budget = 12
    worst = graph.copy()
    worst.scores = -graph.scores  # the edges EAP ranks last: a poor circuit to start from
    start = worst.top_n(budget, absolute=False)
    before = start.in_graph.clone()
    refined = refine(llama, start, pairs, budget=budget, absolute=absolute, rounds=6)
    assert torch.equal(start.in_graph, before)  # the caller's circuit is untouched
    assert refined.n_in_graph <= budget
    gain = _objective(llama, refined, pairs, absolute, full) - _objective(llama, start, pairs, absolute, full)
    assert gain > 0.05 * abs(full)


def test_refined_selection_never_does_worse_than_its_base_on_its_pairs(llama):
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    attribute(llama, graph, pairs, method="eap-ig-inputs", quiet=True)
    percentages = (2.0, 5.0, 20.0, 100.0)
    plain = faithfulness_curve(llama, graph, pairs, absolute=False, percentages=percentages, quiet=True)
    refined = faithfulness_curve(
        llama,
        graph,
        pairs,
        absolute=False,
        percentages=percentages,
        selection=refined_selection(llama, pairs, rounds=3),
        quiet=True,
    )
    total = int(mib_edge_weights(graph).sum())  # the curve's budgets: MIB's protocol
    for a, b in zip(plain.points, refined.points):
        assert b.n_edges <= int(b.fraction * total)
        assert b.faithfulness >= a.faithfulness - 1e-6
    assert refined.area_under > plain.area_under
    assert refined.points[-1].faithfulness == pytest.approx(1.0, abs=1e-4)
