"""Faithfulness tests for token attributions: deletion and insertion curves (Petsiuk et al. 2018, as used
for text by e.g. Arras et al. and xai_evals), comprehensiveness and sufficiency (ERASER, DeYoung et al. 2020),
and rank agreement between methods.

A token is removed by putting the filler token (pad, else eos) in its place: the same operation for every
method, so the tests compare orders of tokens, not baselines. The first position (the attention sink) is
never removed, as token IG never attributes it. With the n removable tokens ordered from the highest score
down and f the attributed function (a continuation's log-probability, a contrast of two, or a logit):
- deletion: d_k = f(input without the top k), k = 0..n; its area is the trapezoid mean of d_k - d_n over
  k / n in [0, 1]. A faithful order makes f fall fast: lower is better.
- insertion: i_k = f(only the top k present), k = 0..n; area of i_k - i_0 likewise; higher is better.
- comprehensiveness: mean over q in `FRACTIONS` of f(input) - f(input without the top ceil(q n));
  sufficiency: mean over q of f(input) - f(only the top ceil(q n)). Higher and lower are better.
Areas are reported over prompts as sum(area) / sum(d_0 - d_n), a ratio of means that stays defined when one
prompt's f barely changes; comprehensiveness and sufficiency in units of f. `summarize` adds bootstrap
percentile intervals over prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.errors import InputError
from circuits.evaluation.intervals import LEVEL, RESAMPLES, Interval, percentile_interval, resample_indices
from circuits.models.hooked import HookedModel, uses_model
from circuits.steering.token_ig import TokenAttribution, _objectives

FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)  # ERASER's bins of the top tokens


@dataclass(frozen=True)
class TokenFaithfulness:
    """One prompt's tests (see the module docstring); curves in units of f."""

    deletion: Tensor  # [n + 1] f with the top k removed
    insertion: Tensor  # [n + 1] f with only the top k present
    comprehensiveness: float
    sufficiency: float

    @property
    def full_change(self) -> float:
        """f(input) - f(every removable token removed)."""
        return float(self.deletion[0] - self.deletion[-1])

    @property
    def deletion_area(self) -> float:
        return _trapezoid_mean(self.deletion - self.deletion[-1])

    @property
    def insertion_area(self) -> float:
        return _trapezoid_mean(self.insertion - self.insertion[0])


def _trapezoid_mean(curve: Tensor) -> float:
    return float((curve[1:] + curve[:-1]).double().sum() / (2 * (len(curve) - 1)))


@uses_model
def token_faithfulness(
    model: HookedModel,
    prompt: str,
    scores: Tensor | TokenAttribution,
    continuation: str | None = None,
    *,
    dispreferred: str | None = None,
    target: str | int | None = None,
    first: int = 1,
    max_rows: int = 64,
) -> TokenFaithfulness:
    """Deletion / insertion curves, comprehensiveness and sufficiency of `scores` [n_prompt_tokens] for
    f = log p(continuation | prompt) (minus log p(dispreferred | prompt) when given), or the logit of
    `target`. Positions before `first` are never removed (1: the attention sink; BOS counts as it)."""
    if isinstance(scores, TokenAttribution):
        scores = scores.scores
    ids = model.to_ids([prompt])[0]
    if scores.shape != (len(ids),):
        raise InputError(
            f"scores must have shape ({len(ids)},) (the prompt's tokens), got {tuple(scores.shape)}"
        )
    if not 0 <= first < len(ids):
        raise InputError(f"first must be in 0..{len(ids) - 1}, got {first}")
    filler = model.tokenizer.pad_token_id
    filler = model.tokenizer.eos_token_id if filler is None else filler
    order = scores[first:].argsort(descending=True, stable=True) + first
    n = len(order)
    counts = sorted({min(n, math.ceil(q * n)) for q in FRACTIONS})
    rows = []  # [removed] prompts: deletion k = 0..n, insertion k = 0..n, then the ERASER ones
    for keep_top, k_values in ((False, range(n + 1)), (True, range(n + 1)), (False, counts), (True, counts)):
        for k in k_values:
            chosen = set(order[:k].tolist())
            rows.append([t if i < first or (i in chosen) == keep_top else filler for i, t in enumerate(ids)])
    values = _values(model, rows, continuation, dispreferred, target, max_rows)
    deletion, insertion = values[: n + 1], values[n + 1 : 2 * n + 2]
    removed, kept = values[2 * n + 2 : 2 * n + 2 + len(counts)], values[2 * n + 2 + len(counts) :]
    full = float(deletion[0])
    return TokenFaithfulness(deletion, insertion, full - float(removed.mean()), full - float(kept.mean()))


def _values(
    model: HookedModel,
    rows: list[list[int]],
    continuation: str | None,
    dispreferred: str | None,
    target: str | int | None,
    max_rows: int,
) -> Tensor:
    """f of each prompt row [R] (rows of one length), in float64."""
    total = torch.zeros(len(rows), dtype=torch.float64)
    for ids, f, sign in _objectives(model, rows[0], continuation, target, None, dispreferred):
        suffix = ids[len(rows[0]) :]
        with torch.no_grad():
            for i in range(0, len(rows), max_rows):
                batch = torch.tensor([row + suffix for row in rows[i : i + max_rows]], device=model.device)
                total[i : i + len(batch)] += sign * f(model(batch)).double().cpu()
    return total


def rank_agreement(a: Tensor, b: Tensor, first: int = 1) -> float:
    """Spearman's rank correlation of two score vectors over the positions from `first` on (ties broken by
    position)."""
    ranks = [x[first:].double().argsort(stable=True).argsort().double() for x in (a, b)]
    if len(ranks[0]) < 2:
        raise InputError("rank agreement needs at least two attributed tokens")
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


@dataclass(frozen=True)
class FaithfulnessSummary:
    """The tests over prompts, each with a bootstrap percentile interval over prompts."""

    deletion_auc: Interval  # sum of deletion areas / sum of full changes (lower is better)
    insertion_auc: Interval  # likewise (higher is better)
    comprehensiveness: Interval  # mean, units of f (higher is better)
    sufficiency: Interval  # mean, units of f (lower is better)
    prompts: int


def summarize(
    results: Sequence[TokenFaithfulness], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> FaithfulnessSummary:
    """Aggregate per-prompt tests with percentile intervals from `resamples` resamples of the prompts."""
    draws = resample_indices(len(results), resamples, seed)
    columns = {
        name: torch.tensor([getattr(r, name) for r in results], dtype=torch.float64)
        for name in ("deletion_area", "insertion_area", "full_change", "comprehensiveness", "sufficiency")
    }
    full = columns["full_change"]

    def ratio(name: str) -> Interval:
        area = columns[name]
        return percentile_interval(
            float(area.sum() / full.sum()), area[draws].sum(-1) / full[draws].sum(-1), level
        )

    def mean(name: str) -> Interval:
        return percentile_interval(float(columns[name].mean()), columns[name][draws].mean(-1), level)

    return FaithfulnessSummary(
        ratio("deletion_area"),
        ratio("insertion_area"),
        mean("comprehensiveness"),
        mean("sufficiency"),
        len(results),
    )
