"""Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> a year > 32.

Tokenizers with two-digit number tokens (GPT-2) predict the end year's last two digits as one token; the
metric is sum p(yy > YY) - sum p(yy <= YY) over the tokens 00..99. Tokenizers that split numbers into digits
(SmolLM2, Llama) predict the tens digit first; the metric is then sum p(d > t) - sum p(d < t) over the
digits 0..9, with t the tens digit of YY (the equal digit is undecided at this token and left out).
Corrupted prompts start the range at 01, which carries no information about the answer.

The example's answer / distractor ids mark the boundaries: "greater" is every number token at or after the
answer, "smaller" every one at or before the distractor.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from circuits.data import PromptPairs
from circuits.metrics import last_logits
from circuits.models.hooked import HookedModel
from circuits.task import TaskPairs

from .common import Example, collect_pairs, is_single_token

NOUNS = ["war", "expedition", "reign", "project", "dynasty", "campaign", "siege", "construction", "journey"]
TEMPLATE = "The {noun} lasted from the year {century}{yy} to the year {century}"
CENTURIES = ["15", "16", "17", "18"]


class GreaterThanMetric:
    """p(number tokens >= answer) - p(number tokens <= distractor) at the last position, [batch]."""

    last_position = True  # reads logits through `last_logits` only

    def __init__(self, number_ids: list[int]) -> None:
        self.number_ids = torch.tensor(number_ids)  # ordered: value i has id number_ids[i]
        self.__name__ = "greater_than_prob_diff"

    def __call__(self, logits: Tensor, pairs: PromptPairs, clean_logits: Tensor | None = None) -> Tensor:  # noqa: ARG002
        ids = self.number_ids.to(logits.device)
        probs = last_logits(logits, pairs).float().softmax(-1)[:, ids]  # [batch, n numbers]
        value = torch.arange(len(ids), device=logits.device)
        lookup = torch.full((int(ids.max()) + 1,), -1, device=logits.device)
        lookup[ids] = value
        first_greater = lookup[pairs.answer.to(logits.device)]
        last_smaller = lookup[pairs.distractor.to(logits.device)]
        greater = value[None, :] >= first_greater[:, None]
        smaller = value[None, :] <= last_smaller[:, None]
        return (probs * greater).sum(-1) - (probs * smaller).sum(-1)


def greater_than_pairs(model: HookedModel, n: int, *, seed: int = 0) -> TaskPairs:
    """`n` greater-than pairs with the probability-difference metric for the model's number tokens."""
    two_digit = all(is_single_token(model, f"{v:02d}") for v in range(100))
    width = 2 if two_digit else 1
    values = range(100) if two_digit else range(10)
    tokens = [f"{v:0{width}d}" for v in values]
    number_ids = [model.single_token_id(t) for t in tokens]

    def propose(rng: random.Random) -> Example:
        century, noun = rng.choice(CENTURIES), rng.choice(NOUNS)
        if two_digit:
            yy = rng.randint(2, 98)
            answer, distractor = f"{yy + 1:02d}", f"{yy:02d}"
        else:
            yy = rng.randint(12, 88)  # tens digit 1..8: both sides non-empty
            answer, distractor = str(yy // 10 + 1), str(yy // 10 - 1)
        clean = TEMPLATE.format(noun=noun, century=century, yy=f"{yy:02d}")
        corrupted = TEMPLATE.format(noun=noun, century=century, yy="01")
        return Example(clean, corrupted, answer, distractor)

    return collect_pairs(model, "greater_than", n, propose, GreaterThanMetric(number_ids), seed)
