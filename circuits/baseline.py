"""How well a model does a task before any intervention: one call, so users see it at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuits.data import PromptPairs
from circuits.metrics import Metric, get_metric
from circuits.models.hooked import HookedModel, uses_model
from circuits.task import TaskPairs


@dataclass
class Baseline:
    clean_metric: float  # mean metric on clean prompts
    corrupted_metric: float  # mean metric on corrupted prompts
    accuracy: float  # fraction of clean prompts with a positive metric (answer beats distractor)
    n: int

    def __str__(self) -> str:
        return (
            f"clean metric {self.clean_metric:.3f}, corrupted metric {self.corrupted_metric:.3f}, "
            f"accuracy {self.accuracy:.1%} (n={self.n})"
        )


@uses_model
def baseline(
    model: HookedModel,
    data: TaskPairs | PromptPairs,
    metric: str | Metric | None = None,
    batch_size: int = 16,
) -> Baseline:
    """Mean metric on clean and corrupted prompts, and the fraction of clean prompts where it is positive.

    With `TaskPairs` the task's own metric is used unless `metric` is given; plain `PromptPairs` default to
    the logit difference. For difference metrics (logit / probability difference, greater-than) a
    positive value means the model prefers the answer.
    """
    pairs = data.pairs if isinstance(data, TaskPairs) else data
    fn = get_metric(pairs.metric_for(metric))  # a task's pairs carry its metric
    clean_total = corrupted_total = correct = 0.0
    for batch in pairs.batches(batch_size):
        with torch.no_grad():
            clean = model(batch.clean.to(model.device), batch.attention_mask.to(model.device))
            corrupted = model(batch.corrupted.to(model.device), batch.corrupted_mask.to(model.device))
        clean_values = fn(clean, batch, clean)
        clean_total += float(clean_values.sum())
        corrupted_total += float(fn(corrupted, batch.corrupted_side(), clean).sum())
        correct += float((clean_values > 0).sum())
    n = len(pairs)
    return Baseline(clean_total / n, corrupted_total / n, correct / n, n)
