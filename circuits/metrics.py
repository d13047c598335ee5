"""Task metrics: a scalar per example from logits at the last real position of each prompt.

A metric is a callable `metric(logits, pairs, clean_logits) -> [batch]` with logits [batch, pos, d_vocab];
`clean_logits` (same shape) is given for metrics that compare with the clean run (KL).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from circuits.data import PromptPairs


class Metric(Protocol):
    def __call__(self, logits: Tensor, pairs: PromptPairs, clean_logits: Tensor | None = None) -> Tensor: ...


def last_logits(logits: Tensor, pairs: PromptPairs) -> Tensor:
    """[batch, d_vocab] logits at each prompt's last real token."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, (pairs.lengths.to(logits.device) - 1)]


def _pick(last: Tensor, ids: Tensor) -> Tensor:
    return last.gather(1, ids.to(last.device)[:, None])[:, 0]


def logit_diff(logits: Tensor, pairs: PromptPairs, clean_logits: Tensor | None = None) -> Tensor:
    """logit(answer) - logit(distractor) at the last real position, [batch]."""
    last = last_logits(logits, pairs).float()
    return _pick(last, pairs.answer) - _pick(last, pairs.distractor)


def prob_diff(logits: Tensor, pairs: PromptPairs, clean_logits: Tensor | None = None) -> Tensor:
    """p(answer) - p(distractor) at the last real position, [batch]."""
    probs = last_logits(logits, pairs).float().softmax(-1)
    return _pick(probs, pairs.answer) - _pick(probs, pairs.distractor)


def kl_divergence(logits: Tensor, pairs: PromptPairs, clean_logits: Tensor | None = None) -> Tensor:
    """KL(clean || this run) of the next-token distribution at the last real position, [batch]."""
    if clean_logits is None:
        raise ValueError("kl_divergence needs the clean logits")
    logp = last_logits(logits, pairs).float().log_softmax(-1)
    logq = last_logits(clean_logits, pairs).float().log_softmax(-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def answer_logprob(logits: Tensor, pairs: PromptPairs, clean_logits: Tensor | None = None) -> Tensor:
    """log p(answer) at the last real position, [batch]."""
    return _pick(last_logits(logits, pairs).float().log_softmax(-1), pairs.answer)


METRICS: dict[str, Metric] = {
    "logit_diff": logit_diff,
    "prob_diff": prob_diff,
    "kl": kl_divergence,
    "answer_logprob": answer_logprob,
}


def get_metric(metric: str | Metric) -> Metric:
    if callable(metric):
        return metric
    try:
        return METRICS[metric]
    except KeyError:
        raise ValueError(
            f"unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a callable"
        ) from None
