"""clean-corrupted and eap-ig-activations against hand-written loops over the independent brute force of
`tests/brute_force.py` (every edge, value by value), on both tiny layouts."""

import torch

from circuits import Graph, attribute
from tests import brute_force
from tests.pairs import make_pairs


def _deltas(model, pairs):
    clean = brute_force.source_outputs(model, pairs.clean)
    corrupted = brute_force.source_outputs(model, pairs.corrupted)
    return {name: corrupted[name] - clean[name] for name in clean}


def _assert_scores(ours, want):
    err = (ours.double() - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), f"max error {err:.3g} vs max score {want.abs().max():.3g}"


def test_clean_corrupted_is_the_mean_of_clean_and_corrupted_gradients(tiny):
    pairs = make_pairs(tiny)
    graph = Graph.from_model(tiny)
    deltas = _deltas(tiny, pairs)
    at_clean = brute_force.destination_grads(tiny, graph, pairs)
    at_corrupted = brute_force.destination_grads(tiny, graph, pairs, ids=pairs.corrupted)
    mean = {dst: (at_clean[dst] + at_corrupted[dst]) / 2 for dst in at_clean}
    ours = attribute(tiny, graph, pairs, method="clean-corrupted", quiet=True).edge_scores
    _assert_scores(ours, brute_force.gradient_scores(graph, deltas, mean))


def test_eap_ig_activations_interpolates_one_source_group_at_a_time(tiny):
    """For each group (input, a layer's heads, a layer's MLP): the group's summed output is moved along
    ablated -> clean in m left-Riemann steps (alpha = k/m), the rest of the model clean; its sources'
    edges get delta_u . mean_k dM/dx_v."""
    pairs = make_pairs(tiny)
    graph = Graph.from_model(tiny)
    m = 3
    deltas = _deltas(tiny, pairs)
    groups = [("blocks.0.hook_resid_pre", ["input"])]
    for layer in range(tiny.spec.n_layers):
        heads = graph.sources[graph.head_sources(layer)]
        groups += [(f"blocks.{layer}.hook_attn_out", heads), (f"blocks.{layer}.hook_mlp_out", [f"m{layer}"])]
    captured = {}
    with (
        torch.no_grad(),
        tiny.hooks([(hook, lambda x, h=hook: captured.__setitem__(h, x.clone())) for hook, _ in groups]),
    ):
        tiny(pairs.clean)
    want = torch.zeros(graph.valid.shape, dtype=torch.float64)
    for hook, members in groups:
        group_delta = sum(deltas[name] for name in members)
        for k in range(m):
            point = captured[hook] + (1 - k / m) * group_delta  # k = 0: fully ablated

            def replace(_x, point=point):
                return point

            grads = brute_force.destination_grads(tiny, graph, pairs, extra_hooks=[(hook, replace)])
            want += brute_force.gradient_scores(graph, deltas, grads, members) / m
    ours = attribute(tiny, graph, pairs, method="eap-ig-activations", ig_steps=m, quiet=True).edge_scores
    _assert_scores(ours, want)
