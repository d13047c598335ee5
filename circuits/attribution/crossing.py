"""Crossing edges of position-aware circuits (PEAP: Haklay et al., ACL 2025, arXiv 2502.04577): inside
attention, from the key (value) input of kv head g at span a to the output of a query head h of g's group
at a span b >= a.

Ablating the crossing edge k_g@a -> h@b gives head h, at its queries in span b, the ablated keys of kv
head g at the positions of span a, everything else as in the clean run. The ablated key input is what the
k projection reads from the ablated residual stream, resid + sum_u (a_u(ablated) - a_u(clean)) over the
sources reaching the layer (the corrupted run's own key input, when patching prompts of equal length).

One forward pass per (span a, letter) group, the groups stacked in the batch, gives every crossing edge's
exact effect on its head: in each attention layer the k (v) inputs at span a are set to their ablated
values, the head outputs z read and then set back to their clean values (so the residual stream, and every
later layer's inputs, stay clean), which leaves dz_h = z_h(patched) - z_h(clean) at every query position,
for every layer at once. Grouped-query attention stays grouped: patching kv head g's keys moves the
outputs of all of g's query heads, each read apart.

- PEAP's score: sum_{q in b} dz_h[q] W_O[h] . dM/d(out)[q], the head's output recomputed exactly, the rest
  of the model linearised (`gradient_scores`, with the gradient of the method's backward pass at the
  layer's summed head output);
- exact: M(clean run with z_h += dz_h at span b's queries) - M(clean run) (`exact` in `methods`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from circuits.graph import Graph
from circuits.models.hooked import HookedModel, HookFn
from circuits.models.wiring import SourceSite, residual_factors, wiring
from circuits.sources import SourceOutputs
from circuits.span_graph import LETTERS


def head_sites(model: HookedModel, graph: Graph) -> list[SourceSite]:
    """The attention layers with a node per head (a post-norm layer's one attention node has none)."""
    return [site for site in wiring(model, graph.spec).sources if site.per_head]


def _ablated_residual_change(
    model: HookedModel, graph: Graph, layer: int, letter: str, delta: SourceOutputs
) -> Tensor:
    """[b, P, d] sum over the sources reaching the layer's `letter` inputs of their ablation differences,
    each times what the residual stream multiplies it by on the way (`wiring.residual_factors`)."""
    cols = graph.qkv_destinations(layer, letter)
    n = graph.valid_prefixes()[cols.start]
    factors = residual_factors(model, graph.spec)
    total: Tensor | None = None
    for sources, matrix in delta.matrices(slice(0, n)):  # [m, b * P * d]
        weights = torch.ones(matrix.shape[0], dtype=torch.float64)
        if factors is not None:
            weights = factors[0][sources] * factors[1][cols.start]
        part = weights.to(matrix) @ matrix
        total = part if total is None else total + part.to(total)
    b, p, _, d = delta.shape
    assert total is not None
    return total.view(b, p, d)


def head_output_changes(
    model: HookedModel,
    graph: Graph,
    clean_ids: Tensor,
    attention_mask: Tensor,
    span_index: Tensor,
    n_spans: int,
    delta: SourceOutputs,
    max_rows: int,
) -> dict[int, Tensor]:
    """Per attention layer with head nodes, dz [S, 2, b, P, n_heads * d_head]: the change of every head's
    output z when the layer's key (value) inputs at span a alone take their ablated values (see module doc).

    Args:
        clean_ids, attention_mask: [b, P] the clean prompts.
        span_index: [b, P] each position's span, -1 on padding.
        delta: [b, P, n_sources, d] ablated - clean source outputs.
    """
    sites = head_sites(model, graph)
    b, n_pos = clean_ids.shape
    resid, clean_z = clean_attention(model, graph, clean_ids, attention_mask)
    ablated = ablated_head_inputs(model, graph, resid, delta)
    groups = [(a, letter) for a in range(n_spans) for letter in range(len(LETTERS))]
    per_chunk = max(1, max_rows // b)
    out: dict[int, list[Tensor]] = {site.layer: [] for site in sites}
    for start in range(0, len(groups), per_chunk):
        chunk = groups[start : start + per_chunk]
        g = len(chunk)
        spans = torch.tensor([a for a, _ in chunk], device=span_index.device)
        letters = torch.tensor([letter for _, letter in chunk])
        inside = span_index[None] == spans[:, None, None]  # [g, b, P]
        changes: dict[int, Tensor] = {}
        hooks = []
        for site in sites:
            for i, letter in enumerate(LETTERS):
                where = inside & (letters == i).to(inside.device)[:, None, None]
                value = ablated[(site.layer, letter)]
                hooks.append((model.head_input_hook(site.layer, letter), _patched(where, value)))
            hooks.append((site.hook, _changed_then_restored(changes, site.layer, clean_z[site.layer], g)))
        with torch.no_grad(), model.hooks(hooks):
            model(clean_ids.repeat(g, 1), attention_mask.repeat(g, 1))
        for layer, dz in changes.items():
            out[layer].append(dz)
    return {layer: torch.cat(parts).view(n_spans, len(LETTERS), b, n_pos, -1) for layer, parts in out.items()}


def clean_attention(
    model: HookedModel, graph: Graph, ids: Tensor, attention_mask: Tensor
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Per attention layer with head nodes, the clean run's residual at the attention norm's input
    [b, P, d_model] and its heads' outputs z [b, P, n_heads * d_head]."""
    resid: dict[int, Tensor] = {}
    clean_z: dict[int, Tensor] = {}
    hooks: list[tuple[str, HookFn]] = []
    for site in head_sites(model, graph):
        hooks.append((model.attn_norm_in_hook(site.layer), _keep(resid, site.layer)))
        hooks.append((site.hook, _keep(clean_z, site.layer)))
    with torch.no_grad(), model.hooks(hooks):
        model(ids, attention_mask)
    return resid, clean_z


def ablated_head_inputs(
    model: HookedModel, graph: Graph, resid: dict[int, Tensor], delta: SourceOutputs
) -> dict[tuple[int, str], Tensor]:
    """(layer, k / v) -> the layer's key (value) inputs [b, P, n_kv * width] computed from the ablated
    residual stream, resid + every upstream source's ablation difference (`resid` from `clean_attention`)."""
    ablated: dict[tuple[int, str], Tensor] = {}
    for site in head_sites(model, graph):
        for letter in LETTERS:
            change = _ablated_residual_change(model, graph, site.layer, letter, delta)
            n = graph.spec.n_qkv_heads(letter)
            x = (resid[site.layer] + change.to(resid[site.layer])).unsqueeze(2).expand(-1, -1, n, -1)
            with torch.no_grad():
                ablated[(site.layer, letter)] = model.qkv_from_residual(site.layer, letter, x).flatten(2)
    return ablated


def _keep(store: dict[int, Tensor], layer: int) -> HookFn:
    def hook(x: Tensor) -> None:
        store[layer] = x.detach().clone()

    return hook


def _patched(where: Tensor, value: Tensor) -> HookFn:
    """Rows of group i (of the g stacked copies) take `value` [b, P, w] where `where[i]` [b, P]."""

    def hook(x: Tensor) -> Tensor:
        g = where.shape[0]
        stacked = x.view(g, -1, *x.shape[1:])
        mask = where.to(x.device)[..., None]
        return torch.where(mask, value.to(x)[None], stacked).view_as(x)

    return hook


def _changed_then_restored(changes: dict[int, Tensor], layer: int, clean: Tensor, g: int) -> HookFn:
    """Keep z - z(clean) of the g stacked copies, [g, b, P, w], and give the layer its clean z back."""

    def hook(z: Tensor) -> Tensor:
        base = clean.to(z)
        changes[layer] = (z.view(g, *base.shape) - base).float()
        return base.repeat(g, 1, 1)

    return hook


def gradient_scores(
    model: HookedModel,
    graph: Graph,
    changes: dict[int, Tensor],
    output_grads: dict[int, Tensor],
    span_index: Tensor,
    n_spans: int,
) -> Tensor:
    """PEAP's crossing-edge scores [S, S, n_sources, 2] summed over the batch: for key / value span a, query
    span b, head h, sum over the queries q in b of dz_h[q] . W_O[h] g[q], with g = dM/d(the layer's summed
    head output) [b, P, d_model] (`output_grads`, per layer)."""
    spec = graph.spec
    scores = torch.zeros(n_spans, n_spans, graph.n_sources, len(LETTERS))
    for site in head_sites(model, graph):
        dz = changes[site.layer]  # [S, 2, b, P, H * d_head]
        g = output_grads.get(site.layer)
        if g is None:  # no gradient reached the layer's heads
            continue
        heads = dz.view(*dz.shape[:4], spec.n_heads, spec.d_head)
        grad = torch.einsum("xpd,hed->xphe", g.to(dz), model.W_O(site.layer).to(dz))  # dM/dz per head
        at = _one_hot(span_index.to(dz.device), n_spans).to(dz)  # [b, P, S]
        per_head = torch.einsum("alxphe,xphe,xps->ashl", heads, grad, at)
        scores[:, :, site.sources] += per_head.cpu()
    return scores


def _one_hot(span_index: Tensor, n_spans: int) -> Tensor:
    one_hot = torch.nn.functional.one_hot(span_index.clamp(min=0), n_spans)
    return one_hot * (span_index >= 0).unsqueeze(-1)


def exact_hooks(
    model: HookedModel,
    graph: Graph,
    units: Tensor,
    changes: dict[int, Tensor],
    span_index: Tensor,
    b: int,
) -> list[tuple[str, HookFn]]:
    """Hooks ablating crossing edge units[i] = (span a, span b, head source, letter) in rows i * b ..
    (i + 1) * b - 1: z_h += dz_h at the queries of span b (`head_output_changes`)."""
    spec = graph.spec
    hooks: list[tuple[str, HookFn]] = []
    for site in head_sites(model, graph):
        mine = ((units[:, 2] >= site.sources.start) & (units[:, 2] < site.sources.stop)).nonzero()[:, 0]
        if mine.numel() == 0:
            continue
        dz = changes[site.layer]
        adds = []
        for i in mine.tolist():
            a, span, source, letter = units[i].tolist()
            head = source - site.sources.start
            keep = (span_index == span)[..., None].to(dz)  # [b, P, 1]
            add = torch.zeros(*dz.shape[2:4], spec.n_heads, spec.d_head, device=dz.device)
            add[:, :, head] = dz[a, letter].view(*dz.shape[2:4], spec.n_heads, spec.d_head)[:, :, head] * keep
            adds.append((i, add.flatten(2)))
        hooks.append((site.hook, _added_to_rows(adds, b)))
    return hooks


def _added_to_rows(adds: list[tuple[int, Tensor]], b: int) -> Callable[[Tensor], Tensor]:
    def hook(z: Tensor) -> Tensor:
        z = z.clone()
        for i, add in adds:
            z[i * b : (i + 1) * b] += add.to(z)
        return z

    return hook
