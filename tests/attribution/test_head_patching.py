"""Activation patching of single heads, against node-level exact patching and a one-head-at-a-time loop."""

import torch

from circuits import Graph, attribute, head_patching
from circuits.metrics import logit_diff
from tests.pairs import make_pairs


def _one_head_at_a_time(model, pairs, layer, head):
    """M(clean with head (layer, head)'s z from the corrupted run) - M(clean): two plain passes."""
    cols = slice(head * model.spec.d_head, (head + 1) * model.spec.d_head)
    seen = {}
    with (
        torch.no_grad(),
        model.hooks([(model.head_z_hook(layer), lambda z: seen.setdefault("z", z.clone()))]),
    ):
        model(pairs.corrupted, pairs.attention_mask)

    def patch(z):
        z = z.clone()
        z[:, :, cols] = seen["z"][:, :, cols]
        return z

    with torch.no_grad():
        clean = model(pairs.clean, pairs.attention_mask)
        with model.hooks([(model.head_z_hook(layer), patch)]):
            patched = model(pairs.clean, pairs.attention_mask)
    return float((logit_diff(patched, pairs) - logit_diff(clean, pairs)).mean())


def test_head_patching_matches_a_one_head_loop_on_every_layout(layout):
    pairs = make_pairs(layout)
    effects = head_patching(layout, pairs, max_rows=5, batch_size=2, quiet=True)
    assert effects.shape == (layout.spec.n_layers, layout.spec.n_heads)
    layers = layout.spec.attention_layers  # a hybrid's mixer layers have no heads: NaN rows
    assert bool(effects[list(layout.spec.mixer_layers)].isnan().all())
    want = torch.tensor(
        [[_one_head_at_a_time(layout, pairs, l, h) for h in range(layout.spec.n_heads)] for l in layers]
    )
    torch.testing.assert_close(effects[layers], want, atol=1e-5, rtol=1e-4)
    assert effects[layers].abs().max() > 1e-4


def test_head_patching_equals_node_level_exact_patching(llama):
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    nodes = attribute(llama, graph, pairs, method="exact", level="node", quiet=True).node_scores
    heads = torch.stack([nodes[graph.head_sources(layer)] for layer in range(llama.spec.n_layers)])
    torch.testing.assert_close(head_patching(llama, pairs, quiet=True), heads, atol=1e-5, rtol=1e-4)
