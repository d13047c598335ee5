"""How well a model does a task before any intervention: one call, so users see it at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuits.data import PromptPairs
from circuits.metrics import Metric, get_metric, last_logits
from circuits.models.hooked import HookedModel


@dataclass
class Baseline:
    clean_metric: float  # mean metric on clean prompts
    corrupted_metric: float  # mean metric on corrupted prompts
    accuracy: float  # fraction of clean prompts where the answer outscores the distractor
    n: int

    def __str__(self) -> str:
        return (
            f"clean metric {self.clean_metric:.3f}, corrupted metric {self.corrupted_metric:.3f}, "
            f"accuracy {self.accuracy:.1%} (n={self.n})"
        )


def baseline(
    model: HookedModel, pairs: PromptPairs, metric: str | Metric = "logit_diff", batch_size: int = 16
) -> Baseline:
    """Mean metric on clean and corrupted prompts, and answer-vs-distractor accuracy on clean prompts."""
    fn = get_metric(metric)
    clean_total = corrupted_total = correct = 0.0
    for batch in pairs.batches(batch_size):
        mask = batch.attention_mask.to(model.device)
        with torch.no_grad():
            clean = model(batch.clean.to(model.device), mask)
            corrupted = model(batch.corrupted.to(model.device), mask)
        clean_total += float(fn(clean, batch, clean).sum())
        corrupted_total += float(fn(corrupted, batch, clean).sum())
        last = last_logits(clean, batch)
        rows = torch.arange(len(batch))
        correct += float((last[rows, batch.answer] > last[rows, batch.distractor]).sum())
    n = len(pairs)
    return Baseline(clean_total / n, corrupted_total / n, correct / n, n)
