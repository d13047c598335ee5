"""Bounded memory: recomputing blocks in the backward pass and the `max_memory` plan leave every score as it
was (ground truth: the same call without them), and the plan shrinks settings only as far as needed."""

import pytest
import torch

from circuits import Graph, attribute
from circuits.attribution import METHODS, ScoringOptions, estimate_bytes, plan_memory
from circuits.attribution.memory import GIB
from circuits.errors import InputError
from tests.pairs import make_pairs

RECOMPUTABLE = [name for name, spec in METHODS.items() if spec.recomputable]


def _scores(model, method, level, **options):
    result = attribute(
        model, Graph.from_model(model), make_pairs(model), method=method, level=level, quiet=True, **options
    )
    return result.edge_scores if level == "edge" else result.node_scores


@pytest.mark.parametrize("method", RECOMPUTABLE)
@pytest.mark.parametrize("level", ["edge", "node"])
def test_recomputed_blocks_give_the_same_scores(layout, method, level):
    runs = []
    mixer = getattr(layout.bridge.blocks[0], layout.mixer_component(0) or "attn")  # attention, or a mixer
    handle = mixer.register_forward_hook(lambda *_: runs.append(1))
    try:
        _scores(layout, method, level)  # once for the model's one-off probes
        start = len(runs)
        want = _scores(layout, method, level)
        plain = len(runs) - start
        ours = _scores(layout, method, level, recompute=True)
    finally:
        handle.remove()
    assert len(runs) - start - plain > plain, "the backward passes did not run the first block again"
    assert torch.equal(ours, want)


def test_recompute_with_rules_and_mean_ablation(llama):
    from circuits.attribution import RelPRules

    rules = RelPRules(cp=True)
    for options in ({"rules": rules}, {"ablation": "mean"}):
        want = _scores(llama, "eap", "edge", **options)
        assert torch.equal(_scores(llama, "eap", "edge", recompute=True, **options), want)


def test_max_memory_gives_the_same_scores(llama):
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    given = ScoringOptions("eap-ig-inputs", batch_size=8, max_rows=64)
    small_settings = given.with_settings(batch_size=1, max_rows=1, recompute=True)
    full = estimate_bytes(llama, graph, given, pairs.n_positions, True)
    small = estimate_bytes(llama, graph, small_settings, pairs.n_positions, True)
    assert small < full
    budget = (small + full) / 2 / GIB
    plan = plan_memory(llama, graph, given.with_settings(max_memory=budget), pairs.n_positions, True)
    assert plan.estimate <= budget * GIB and (plan.batch_size, plan.max_rows, plan.recompute) != (
        8,
        64,
        False,
    )
    want = _scores(llama, "eap-ig-inputs", "edge")
    ours = _scores(llama, "eap-ig-inputs", "edge", max_memory=budget)
    assert torch.allclose(ours, want, rtol=1e-5, atol=1e-7)  # other batching: float32 sums in another order


def test_plan_keeps_settings_that_fit_and_refuses_what_cannot(llama):
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    eap = ScoringOptions("eap", batch_size=8, max_rows=64)
    plan = plan_memory(llama, graph, eap.with_settings(max_memory=100.0), pairs.n_positions, True)
    assert (plan.batch_size, plan.max_rows, plan.recompute) == (8, 64, False)
    with pytest.raises(InputError, match="needs about"):
        plan_memory(llama, graph, eap.with_settings(max_memory=0.01), pairs.n_positions, True)
    with pytest.raises(InputError, match="positive"):
        eap.with_settings(max_memory=-1.0)


def test_recompute_is_refused_where_it_cannot_run(llama):
    with pytest.raises(InputError, match="cannot recompute"):
        _scores(llama, "atp*", "edge", recompute=True)


def test_memory_model_grows_quadratically_with_positions(llama):
    graph = Graph.from_model(llama)
    options = ScoringOptions("eap-ig-inputs", batch_size=1, max_rows=1)
    sizes = [estimate_bytes(llama, graph, options, p, True) for p in (256, 512, 1024)]
    first, second = sizes[1] - sizes[0], sizes[2] - sizes[1]
    assert second > 2 * first  # the attention probabilities' P^2 term
