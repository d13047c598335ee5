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
        input_ids: [rows, P].
        ablated: [r, P, n_sources, d_model] source outputs to patch in, with r dividing rows (row i of the
            batch uses ablated row i mod r; e.g. r = b examples repeated for several masks).
        ablation_mask: bool [rows, n_sources, n_destinations] or [n_sources, n_destinations].
    Only the sources with an ablated edge are recorded and patched, so a mask touching few sources
    (exact patching of single edges) costs little more than a plain forward.
    """
    rows, n_pos = input_ids.shape
    if rows % ablated.shape[0]:
        raise ValueError(f"ablated has {ablated.shape[0]} rows, which does not divide the batch's {rows}")
    mask = ablation_mask.to(input_ids.device) & graph.valid.to(input_ids.device)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    sources = mask.any(2).any(0).nonzero()[:, 0]  # sources with at least one ablated edge
    if sources.numel() == 0:
        with torch.no_grad():
            return model(input_ids, attention_mask)
    slot = torch.full((graph.n_sources,), -1, dtype=torch.long)
    slot[sources.cpu()] = torch.arange(sources.numel())
    weights = mask[:, sources].float()  # [rows or 1, k, n_dst]
    patch = ablated[:, :n_pos, sources].repeat(rows // ablated.shape[0], 1, 1, 1)  # [rows, P, k, d]
    current = torch.zeros_like(patch)
    resid: dict[int, Tensor] = {}

    def correction(dst: int | slice) -> Tensor | None:
        """[rows, P, d] (int) or [rows, P, n, d] (slice) summed ablation differences, or None."""
        w = weights[:, :, dst]
        used = w.reshape(w.shape[0], w.shape[1], -1).any(-1).any(0).nonzero()[:, 0]
        if used.numel() == 0:
            return None
        diff = patch[:, :, used] - current[:, :, used]
        w = w[:, used]
        pattern = "bpsd,bs->bpd" if isinstance(dst, int) else "bpsd,bsn->bpnd"
        return torch.einsum(pattern, diff, w.expand(rows, *w.shape[1:]))

    def record(index: int | slice, transform=None) -> HookFn | None:
        """Hook writing the recorded sources among `index` into `current`, or None if none is recorded."""
        ids = torch.arange(graph.n_sources)[index].reshape(-1)
        keep = (slot[ids] >= 0).nonzero()[:, 0]
        if keep.numel() == 0:
            return None
        targets = slot[ids[keep]].to(current.device)

        def hook(x: Tensor) -> None:
            value = transform(x, keep) if transform else x.unsqueeze(2)
            current[:, :, targets] = value.to(current.dtype)

        return hook

    def head_results(layer: int):
        w_o = model.W_O(layer)

        def results(z: Tensor, heads: Tensor) -> Tensor:
            z = z.reshape(*z.shape[:2], spec.n_heads, spec.d_head)[:, :, heads]
            return torch.einsum("bpnh,nhd->bpnd", z, w_o[heads].to(z.dtype))

        return results

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

    spec = graph.spec
    recorders = [(model.input_hook, record(0))]
    for layer in range(spec.n_layers):
        recorders.append((model.head_z_hook(layer), record(graph.head_sources(layer), head_results(layer))))
        recorders.append((model.mlp_out_hook(layer), record(graph.mlp_source(layer))))
    hooks: list[tuple[str, HookFn]] = [(name, fn) for name, fn in recorders if fn is not None]
    for layer in range(spec.n_layers):
        hooks.append((model.attn_norm_in_hook(layer), save_resid(layer)))
        for letter in ("q", "k", "v"):
            hooks.append((model.qkv_out_hook(layer, letter), rebuild_qkv(layer, letter)))  # type: ignore[arg-type]
        hooks.append((model.mlp_norm_in_hook(layer), add_to_input(graph.mlp_destination(layer))))
    hooks.append((model.final_norm_in_hook, add_to_input(graph.logits_destination)))
    with torch.no_grad(), model.hooks(hooks):
        return model(input_ids, attention_mask)
