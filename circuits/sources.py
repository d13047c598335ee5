"""Source outputs: recording them in a forward pass, the source-major buffer they live in, and the values
an ablated edge carries instead (the corrupted run's outputs, a mean over reference prompts, or zero).

Source outputs live in a source-major buffer `[n_sources, B, P, d_model]` (exposed to hooks as the view
`[B, P, n_sources, d_model]`), so that the rows of any prefix of sources form one contiguous matrix
`[n, B * P * d_model]`: the edge scorer (`attribution/recorder.py`) multiplies those rows with gradients,
and circuit evaluation (`intervention.py`) sums them per destination.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from circuits.data import PromptPairs
from circuits.errors import InputError
from circuits.graph import Graph
from circuits.models.hooked import HookedModel, HookFn, uses_model

Ablation = Literal["patching", "mean", "zero"]
ABLATIONS: tuple[Ablation, ...] = ("patching", "mean", "zero")


def source_buffer(graph: Graph, rows: int, n_pos: int, device: torch.device) -> Tensor:
    """Uninitialised source outputs, a [rows, P, n_sources, d] view of source-major storage."""
    storage = torch.empty(graph.n_sources, rows, n_pos, graph.spec.d_model, device=device)
    return storage.permute(1, 2, 0, 3)


def source_major(acts: Tensor) -> Tensor:
    """[B, P, n_sources, d] -> [n_sources, B * P * d] (free for `source_buffer` layouts)."""
    return acts.permute(2, 0, 1, 3).reshape(acts.shape[2], -1)


def source_groups(graph: Graph) -> list[slice]:
    """The sources sharing one gradient: input, then per layer its heads and its MLP."""
    groups = [slice(0, 1)]
    for layer in range(graph.spec.n_layers):
        groups.append(graph.head_sources(layer))
        mlp = graph.mlp_source(layer)
        groups.append(slice(mlp, mlp + 1))
    return groups


def source_hooks(
    model: HookedModel, graph: Graph, out: Tensor, subtract: bool = False
) -> list[tuple[str, HookFn]]:
    """Hooks writing every source's output into `out` [B, P, n_sources, d_model] (no grad), or, with
    `subtract`, subtracting it from what `out` holds (turning ablated outputs into ablated - current).

    A layer's head results z_h W_O[h] (`HookedModel.head_results`) are computed straight into `out` when it
    is source-major storage (`source_buffer`) covering all positions: one batched matmul per layer, the
    subtraction fused into it.
    """

    def write(index: int | slice, transform: Callable[[Tensor], Tensor] | None = None) -> HookFn:
        def fn(x: Tensor) -> None:
            if model.recomputing:  # written in the first run of the block
                return
            with torch.no_grad():
                value = (transform(x) if transform else x).to(out)  # out's device too
                if subtract:
                    out[:, : x.shape[1], index] -= value
                else:
                    out[:, : x.shape[1], index] = value

        return fn

    def write_heads(layer: int) -> HookFn:
        heads = graph.head_sources(layer)
        w_o = model.W_O(layer)
        generic = write(heads, lambda z: model.head_results(layer, z))

        def fn(z: Tensor) -> None:
            if model.recomputing:
                return
            storage = out.permute(2, 0, 1, 3)[heads]  # [n_heads, B, P, d] for source-major storage
            if (
                not storage.is_contiguous()
                or z.shape[:2] != out.shape[:2]
                or z.dtype != out.dtype
                or z.device != out.device
            ):
                generic(z)
                return
            with torch.no_grad():
                n, rows = w_o.shape[0], z.shape[0] * z.shape[1]
                z_heads = z.reshape(rows, n, -1).transpose(0, 1)  # [n_heads, B * P, d_head]
                target = storage.view(n, rows, -1)
                if subtract:
                    target.baddbmm_(z_heads, w_o.to(z.dtype), alpha=-1.0)
                else:
                    torch.bmm(z_heads, w_o.to(z.dtype), out=target)

        return fn

    hooks = [(model.input_hook, write(0))]
    for layer in range(graph.spec.n_layers):
        if graph.spec.per_head_sources:
            hooks.append((model.head_z_hook(layer), write_heads(layer)))
        else:  # post-norm blocks: the layer's normed attention output is the source
            hooks.append((model.attn_out_hook(layer), write(graph.head_sources(layer).start)))
        hooks.append((model.mlp_out_hook(layer), write(graph.mlp_source(layer))))
    return hooks


@uses_model
def source_means(
    model: HookedModel,
    graph: Graph,
    reference: PromptPairs,
    ablation: str,
    batch_size: int = 8,
    n_positions: int | None = None,
) -> Tensor:
    """Ablation values [1, P, n_sources, d] for prompts of up to P = `n_positions` tokens (default: the
    reference's): zeros, or each source's mean output over `reference`'s clean prompts, per position when
    all reference prompts have the same length (else over all real tokens)."""
    d = graph.spec.d_model
    n_pos = reference.n_positions if n_positions is None else n_positions
    per_position = bool((reference.lengths == reference.lengths[0]).all())
    if ablation == "mean" and per_position and reference.n_positions < n_pos:
        raise InputError(
            f"mean ablation per position needs reference prompts at least as long as the prompts scored: "
            f"the reference prompts are {reference.n_positions} tokens, the prompts {n_pos}. Pass reference "
            "prompts of the same length (or of mixed lengths, for one mean over all positions)"
        )
    if ablation == "zero":
        return torch.zeros(1, n_pos, graph.n_sources, d, device=model.device)
    total = torch.zeros(reference.n_positions if per_position else 1, graph.n_sources, d, device=model.device)
    for batch in reference.batches(batch_size):
        acts = torch.zeros(len(batch), batch.n_positions, graph.n_sources, d, device=model.device)
        ids = batch.clean.to(model.device)
        with torch.no_grad(), model.hooks(source_hooks(model, graph, acts)):
            model(ids, batch.attention_mask.to(model.device))
        real = batch.attention_mask.to(model.device)[:, :, None, None].float()
        if per_position:
            total[: batch.n_positions] += (acts * real).sum(0)
        else:
            total += (acts * real).sum((0, 1))
    if per_position:
        return (total[:n_pos] / len(reference)).unsqueeze(0)
    mean = total / reference.lengths.sum()
    return mean.unsqueeze(0).expand(1, n_pos, -1, -1)
