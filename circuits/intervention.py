"""Forward passes with edges ablated: the mechanism behind exact patching and circuit evaluation.

For every destination v, its input becomes
    x_v' = x_v + sum over ablated edges u->v of (a_u(ablated) - a_u(current run)),
where a_u(current run) is u's output in this very forward pass (so ablations upstream propagate) and
a_u(ablated) is a fixed tensor: the corrupted run's output (patching), a mean over a reference set (mean),
or zero. Sources are computed before the destinations that read them, so one forward pass does it.

The ablation set is a mask `[rows, n_sources, n_destinations]` (one per batch row, so that many single-edge
patches run side by side) or `[n_sources, n_destinations]` shared by all rows. A head's q/k/v input is
rebuilt per head: q_h = W_Q[h] norm(resid + D_h) + b_h, written into the projection's output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from circuits.attribution.recorder import source_hooks
from circuits.graph import Graph
from circuits.models.hooked import HookedModel, HookFn, linear_weight


def forward_with_ablation(
    model: HookedModel,
    graph: Graph,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    ablated: Tensor,
    ablation_mask: Tensor,
) -> Tensor:
    """Logits [rows, P, d_vocab] with the edges in `ablation_mask` carrying `ablated` source outputs.

    Args:
        input_ids: [rows, P]; ablated: [rows or 1, P, n_sources, d_model] source outputs to patch in.
        ablation_mask: bool [rows, n_sources, n_destinations] or [n_sources, n_destinations].
    """
    rows, n_pos = input_ids.shape
    spec = graph.spec
    mask = ablation_mask.to(input_ids.device)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0).expand(rows, -1, -1)
    mask = (mask & graph.valid.to(mask.device)).float()
    current = torch.zeros(rows, n_pos, graph.n_sources, spec.d_model, device=input_ids.device)
    resid: dict[int, Tensor] = {}

    def correction(dst: int | slice) -> Tensor | None:
        """[rows, P, d] (int) or [rows, P, n, d] (slice) summed ablation differences, or None."""
        cols = mask[:, :, dst]
        flat = cols.reshape(rows, graph.n_sources, -1)
        active = flat.any(-1).any(0).nonzero()[:, 0]  # only sources with an ablated edge into dst
        if active.numel() == 0:
            return None
        weights = cols[:, active]
        diff = ablated[:, :, active].to(current.dtype) - current[:, :, active]
        pattern = "bpsd,bs->bpd" if isinstance(dst, int) else "bpsd,bsn->bpnd"
        return torch.einsum(pattern, diff, weights)

    def add_to_input(dst: int) -> HookFn:
        def hook(x: Tensor) -> Tensor | None:
            d = correction(dst)
            return None if d is None else x + d.to(x.dtype)

        return hook

    def save_resid(layer: int) -> HookFn:
        def hook(x: Tensor) -> None:
            resid[layer] = x

        return hook

    def rebuild_qkv(layer: int, letter: str) -> HookFn:
        proj = getattr(model.bridge.blocks[layer].attn, letter)._original_component
        n = spec.n_qkv_heads(letter)  # type: ignore[arg-type]
        dst = graph.qkv_destinations(layer, letter)

        def hook(x: Tensor) -> Tensor | None:
            d = correction(dst)
            if d is None:
                return None
            inputs = resid[layer].unsqueeze(2) + d.to(x.dtype)  # [rows, P, n, d_model]
            normed = model.attn_norm(layer)(inputs)
            w = linear_weight(proj).reshape(n, spec.d_head, spec.d_model)
            out = torch.einsum("bpnd,nhd->bpnh", normed, w)
            if proj.bias is not None:
                out = out + proj.bias.reshape(n, spec.d_head)
            return out.reshape(x.shape)

        return hook

    hooks: list[tuple[str, HookFn]] = list(source_hooks(model, graph, current))
    for layer in range(spec.n_layers):
        hooks.append((model.attn_norm_in_hook(layer), save_resid(layer)))
        for letter in ("q", "k", "v"):
            hooks.append((model.qkv_out_hook(layer, letter), rebuild_qkv(layer, letter)))  # type: ignore[arg-type]
        hooks.append((model.mlp_norm_in_hook(layer), add_to_input(graph.mlp_destination(layer))))
    hooks.append((model.final_norm_in_hook, add_to_input(graph.logits_destination)))
    with torch.no_grad(), model.hooks(hooks):
        return model(input_ids, attention_mask)
