"""Activation patching of single attention heads: each head's exact effect, for every block layout.

For layer l and head h: M(clean run with head h's z replaced by its corrupted-run z) - M(clean), the mean
over examples. The patched z goes through everything the model does after it (the output projection, a
post-attention norm, a residual multiplier) and every later layer, so the number is defined and exact even
where per-head *edge* sources are not: post-norm blocks (Gemma-2, Gemma-3), whose graph has one attention
source per layer. On models with per-head sources it equals node-level exact patching of `a{l}.h{h}`.
Activation patching of heads is the classic experiment of Wang et al. 2022 (IOI, arXiv 2211.00593).
"""

from __future__ import annotations

import torch
from torch import Tensor

from circuits.data import check_count, check_pairs
from circuits.distributed import sum_tensor
from circuits.metrics import Metric, check_values, get_metric
from circuits.models.hooked import HookedModel, HookFn, uses_model
from circuits.task import Pairs


@uses_model
def head_patching(
    model: HookedModel,
    pairs: Pairs,
    metric: str | Metric | None = None,
    *,
    batch_size: int = 8,
    max_rows: int = 64,
    quiet: bool = False,
) -> Tensor:
    """[n_layers, n_heads] effects M(head patched to corrupted) - M(clean), mean over the pairs (prompts of
    different lengths: at the aligned positions, `PromptPairs.alignment`); NaN for the rows of layers
    without attention heads (a hybrid model's mixer layers).

    Args:
        batch_size: pairs per batch; `max_rows` bounds the rows of one forward pass (patched copies of a
            batch side by side, one head each).
    """
    check_count(batch_size, "batch_size")
    check_count(max_rows, "max_rows")
    pairs = check_pairs(model, pairs)
    metric_fn = get_metric(pairs.metric_for(metric))
    spec = model.spec
    units = [(layer, head) for layer in spec.attention_layers for head in range(spec.n_heads)]
    totals = torch.zeros(len(units), dtype=torch.float64)
    for where, batch in pairs.process_batches(batch_size, model.device, "head patching", quiet):
        mask = batch.attention_mask.to(model.device)
        clean_ids = batch.clean.to(model.device)
        corrupted_z = _head_inputs(model, batch.corrupted.to(model.device), batch.corrupted_mask)
        if batch.aligned:  # corrupted z at the clean positions they correspond to, clean z elsewhere
            clean_z = _head_inputs(model, clean_ids, mask)
            corrupted_z = {layer: batch.align(z, clean_z[layer]) for layer, z in corrupted_z.items()}
        with torch.no_grad():
            clean_logits = model(clean_ids, mask)
        base = check_values(metric_fn(clean_logits, batch, clean_logits), len(batch), where)
        per_chunk = max(1, max_rows // len(batch))
        for start in range(0, len(units), per_chunk):
            chunk = units[start : start + per_chunk]
            k = len(chunk)
            hooks = [
                (model.head_z_hook(layer), _patch_heads(chunk, layer, corrupted_z[layer], spec.d_head))
                for layer in sorted({layer for layer, _ in chunk})
            ]
            with torch.no_grad(), model.hooks(hooks):
                logits = model(clean_ids.repeat(k, 1), mask.repeat(k, 1))
            values = metric_fn(logits, batch.repeat(k), clean_logits.repeat(k, 1, 1))
            values = check_values(values, k * len(batch), where).reshape(k, len(batch))
            totals[start : start + k] += (values - base).double().sum(1).cpu()
    totals = sum_tensor(totals, model.device).cpu()  # over processes, under torchrun
    effects = torch.full((spec.n_layers, spec.n_heads), float("nan"))
    effects[spec.attention_layers] = (totals / len(pairs)).float().reshape(-1, spec.n_heads)
    return effects


def _head_inputs(model: HookedModel, ids: Tensor, mask: Tensor) -> dict[int, Tensor]:
    """Every layer's z (the output projection's input) [b, P, n_heads * d_head] in a plain forward pass."""
    names = {layer: model.head_z_hook(layer) for layer in model.spec.attention_layers}
    with torch.no_grad(), model.capture(list(names.values()), clone=True) as captured:
        model(ids, mask.to(ids.device))
    return {layer: captured[name] for layer, name in names.items()}


def _patch_heads(chunk: list[tuple[int, int]], layer: int, corrupted: Tensor, d_head: int) -> HookFn:
    """z hook for copies of one batch side by side: copy j gets head chunk[j]'s corrupted z, if in `layer`."""

    def hook(z: Tensor) -> Tensor:
        z = z.clone()
        b = corrupted.shape[0]
        for j, (unit_layer, head) in enumerate(chunk):
            if unit_layer == layer:
                cols = slice(head * d_head, (head + 1) * d_head)
                z[j * b : (j + 1) * b, :, cols] = corrupted[:, :, cols]
        return z

    return hook
