"""Task metrics: a scalar per example from the logits where each prompt's answer is read.

A metric is a callable `metric(logits, pairs, clean_logits) -> [batch]` with logits [batch, pos, d_vocab];
`clean_logits` (same shape) is given for metrics that compare with the clean run (KL). A metric that reads
logits only through `last_logits` (at `pairs.read_positions`: the last real position, or where answers of
several tokens branch) may say so with the `last_position` decorator: the attribution engine then unembeds
only that position and passes logits [batch, 1, d_vocab], skipping the unembedding of every other one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import torch
from torch import Tensor

from circuits.data import PromptPairs
from circuits.errors import InputError, NumericalError


class Metric(Protocol):
    def __call__(self, logits: Tensor, pairs: PromptPairs, clean_logits: Tensor | None = None) -> Tensor: ...


F = TypeVar("F", bound=Callable)


def last_position(metric: F) -> F:
    """Mark `metric` as reading logits only through `last_logits`."""
    metric.last_position = True  # type: ignore[attr-defined]
    return metric


def reads_last_position(metric: Metric, pairs: PromptPairs | None = None) -> bool:
    """Whether `metric` reads only `last_logits` (for `pairs`, when that depends on them)."""
    marked = getattr(metric, "last_position", False)
    if callable(marked):
        return pairs is not None and bool(marked(pairs))
    return bool(marked)


def last_logits(logits: Tensor, pairs: PromptPairs) -> Tensor:
    """[batch, d_vocab] logits at each prompt's read position (`pairs.read_positions`: its last real
    token, or where answers of several tokens branch); logits [batch, pos, d_vocab], or [batch, 1, d_vocab]
    already taken there."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, pairs.read_positions.to(logits.device)]


def _pick(last: Tensor, ids: Tensor) -> Tensor:
    return last.gather(1, ids.to(last.device)[:, None])[:, 0]


@last_position
def logit_diff(logits: Tensor, pairs: PromptPairs, clean_logits: Tensor | None = None) -> Tensor:  # noqa: ARG001 (Metric signature)
    """logit(answer) - logit(distractor) at the last real position, [batch]."""
    last = last_logits(logits, pairs).float()
    return _pick(last, pairs.answer) - _pick(last, pairs.distractor)


@last_position
def prob_diff(logits: Tensor, pairs: PromptPairs, clean_logits: Tensor | None = None) -> Tensor:  # noqa: ARG001 (Metric signature)
    """p(answer) - p(distractor) at the last real position, [batch]."""
    probs = last_logits(logits, pairs).float().softmax(-1)
    return _pick(probs, pairs.answer) - _pick(probs, pairs.distractor)


def flat_at_clean(metric: F) -> F:
    """Mark `metric` as having a zero gradient at the clean run (a divergence from it): methods that take
    the gradient only there (EAP, RelP, AtP*) would rank rounding noise, and refuse it."""
    metric.flat_at_clean = True  # type: ignore[attr-defined]
    return metric


def is_flat_at_clean(metric: Metric) -> bool:
    return bool(getattr(metric, "flat_at_clean", False))


@flat_at_clean
@last_position
def kl_divergence(logits: Tensor, pairs: PromptPairs, clean_logits: Tensor | None = None) -> Tensor:
    """KL(clean || this run) of the next-token distribution at the last real position, [batch]."""
    if clean_logits is None:
        raise InputError("kl_divergence needs the clean logits")
    logp = last_logits(logits, pairs).float().log_softmax(-1)
    logq = last_logits(clean_logits, pairs).float().log_softmax(-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def answer_logprob(logits: Tensor, pairs: PromptPairs, clean_logits: Tensor | None = None) -> Tensor:  # noqa: ARG001 (Metric signature)
    """log p(answer), [batch]: of the answer token at the last real position, or for answers of several
    tokens, of the whole answer teacher-forced (the sum over its tokens of log p(token | prompt, the
    answer's tokens before it); the prompts end with them, `PromptPairs.from_ids`)."""
    if pairs.answer_tokens is None:
        return _pick(last_logits(logits, pairs).float().log_softmax(-1), pairs.answer)
    if logits.shape[1] == 1:
        raise InputError("answer_logprob of answers of several tokens needs the logits at every position")
    tokens = pairs.answer_tokens.to(logits.device)  # [batch, A], -1 after each answer
    first = pairs.lengths.to(logits.device) - pairs.answer_lengths.to(logits.device)  # predicts token 0
    where = (first[:, None] + torch.arange(tokens.shape[1], device=logits.device)).clamp(
        max=logits.shape[1] - 1
    )
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    logp = logits[rows, where].float().log_softmax(-1)  # [batch, A, d_vocab]
    picked = logp.gather(2, tokens.clamp(min=0)[:, :, None])[:, :, 0]
    return (picked * (tokens >= 0)).sum(1)


answer_logprob.last_position = lambda pairs: pairs.answer_tokens is None  # type: ignore[attr-defined]


METRICS: dict[str, Metric] = {
    "logit_diff": logit_diff,
    "prob_diff": prob_diff,
    "kl": kl_divergence,
    "answer_logprob": answer_logprob,
}


def check_values(values: object, rows: int, where: str) -> Tensor:
    """A metric's output: a finite float tensor of shape [rows], else an error naming `where` (the batch
    and its pairs) with what was received."""
    if not isinstance(values, Tensor):
        raise InputError(f"the metric must return a tensor of shape ({rows},); got a {type(values).__name__}")
    if values.shape != (rows,):
        raise InputError(
            f"the metric must return one value per example, shape ({rows},); got {tuple(values.shape)} "
            f"for {where}"
        )
    if not values.dtype.is_floating_point:
        raise InputError(f"the metric must return floats; got dtype {values.dtype} for {where}")
    finite = torch.isfinite(values.detach())
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise NumericalError(
            f"the metric returned {float(values[bad].detach())} for row {bad} of {where}; scores would be "
            "NaN. Check the metric (log of 0, division by 0) and the model's precision"
        )
    return values


def metric_name(metric: str | Metric) -> str:
    """A metric's name for files: a built-in's, or `module:function` for one of the user's."""
    if isinstance(metric, str):
        return metric
    return f"{getattr(metric, '__module__', '?')}:{getattr(metric, '__qualname__', type(metric).__name__)}"


def get_metric(metric: str | Metric) -> Metric:
    if callable(metric):
        return metric
    if not isinstance(metric, str):
        raise InputError(
            f"metric must be a name {sorted(METRICS)} or a callable, got {type(metric).__name__}"
        )
    try:
        return METRICS[metric]
    except KeyError:
        raise InputError(
            f"unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a callable"
        ) from None
