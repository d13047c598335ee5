"""Faithfulness of a circuit: run the model with every edge outside it ablated (DESIGN.md section 4).

f(C) = (M(C) - M(empty)) / (M(full) - M(empty)), a ratio of dataset means. The caller's graph is never
modified: the ablation mask is computed from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from circuits.attribution import source_means
from circuits.attribution.recorder import source_hooks
from circuits.data import PromptPairs
from circuits.graph import Graph
from circuits.intervention import forward_with_ablation
from circuits.metrics import Metric, get_metric
from circuits.models.hooked import HookedModel


@dataclass
class Evaluation:
    per_example: Tensor  # [N] metric with the circuit alone
    circuit: float  # mean M(circuit)
    full: float  # mean M(full model)
    empty: float  # mean M(every edge ablated)

    @property
    def faithfulness(self) -> float:
        return (self.circuit - self.empty) / (self.full - self.empty)


def evaluate(
    model: HookedModel,
    circuit: Graph,
    pairs: PromptPairs,
    metric: str | Metric = "logit_diff",
    ablation: Literal["patching", "mean", "zero"] = "patching",
    *,
    reference: PromptPairs | None = None,
    complement: bool = False,
    batch_size: int = 8,
) -> Evaluation:
    """Metric of the circuit (edges with `in_graph`), the full model and the empty circuit.

    complement=True ablates the circuit's edges instead, keeping everything else.
    """
    circuit.check_fits(model.spec)
    fn = get_metric(metric)
    keep = circuit.in_graph & circuit.valid
    ablate = keep if complement else circuit.valid & ~keep
    means = (
        None
        if ablation == "patching"
        else source_means(model, circuit, reference or pairs, ablation, batch_size)
    )
    values, full, empty = [], 0.0, 0.0
    for batch in pairs.batches(batch_size):
        ids, mask = batch.clean.to(model.device), batch.attention_mask.to(model.device)
        if means is None:
            acts = torch.zeros(len(batch), batch.n_positions, circuit.n_sources, circuit.spec.d_model)
            with torch.no_grad(), model.hooks(source_hooks(model, circuit, acts)):
                model(batch.corrupted.to(model.device), mask)
        else:
            acts = means[:, : batch.n_positions]
        with torch.no_grad():
            clean_logits = model(ids, mask)
        patched = forward_with_ablation(model, circuit, ids, mask, acts, ablate)
        nothing = forward_with_ablation(model, circuit, ids, mask, acts, circuit.valid)
        values.append(fn(patched, batch, clean_logits).cpu())
        full += float(fn(clean_logits, batch, clean_logits).sum())
        empty += float(fn(nothing, batch, clean_logits).sum())
    per_example = torch.cat(values)
    n = len(pairs)
    return Evaluation(per_example, float(per_example.mean()), full / n, empty / n)
