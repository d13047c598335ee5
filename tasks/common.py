"""What every generated task shares: the result type and the loop that keeps only usable examples.

A task proposes examples (clean text, corrupted text, answer, distractor) from a seeded RNG; an example is
kept only if answer and distractor are single tokens and the clean and corrupted prompts have the same
token length under the model's tokenizer. The rest are dropped and counted, so users see what a tokenizer
cost them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from circuits.data import PromptPairs
from circuits.errors import InputError
from circuits.metrics import Metric
from circuits.models.hooked import HookedModel
from circuits.spans import Spans
from circuits.task import TaskPairs


@dataclass
class Example:
    clean: str
    corrupted: str
    answer: str  # text of the correct next token, e.g. " Mary"
    distractor: str  # text of the contrasting token
    # the clean prompt as named pieces [(span name, text), ...] concatenating to it, where the generator
    # knows its template (`circuits.spans.Spans.from_segments`)
    segments: list[tuple[str, str]] | None = None


def is_single_token(model: HookedModel, text: str) -> bool:
    return len(model.tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def single_tokens(model: HookedModel, words: list[str], prefix: str = " ") -> list[str]:
    """The words whose `prefix + word` is one token for the model's tokenizer."""
    return [w for w in words if is_single_token(model, prefix + w)]


def collect_pairs(
    model: HookedModel,
    task: str,
    n: int,
    propose: Callable[[random.Random], Example],
    metric: str | Metric,
    seed: int = 0,
    max_attempts_per_example: int = 50,
) -> TaskPairs:
    """Keep `n` proposals that tokenize to equal-length pairs with single-token answers."""
    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    kept: list[Example] = []
    dropped = 0
    while len(kept) < n:
        if dropped > max_attempts_per_example * n:
            raise InputError(
                f"{task}: could only make {len(kept)} of {n} usable pairs for {model.spec.name} "
                f"({dropped} proposals had multi-token answers or unequal clean/corrupted lengths)"
            )
        example = propose(rng)
        clean, corrupted = model.to_ids([example.clean, example.corrupted])
        usable = (
            len(clean) == len(corrupted)
            and is_single_token(model, example.answer)
            and is_single_token(model, example.distractor)
        )
        if usable:
            kept.append(example)
        else:
            dropped += 1
    pairs = PromptPairs.from_strings(
        model,
        [e.clean for e in kept],
        [e.corrupted for e in kept],
        [e.answer for e in kept],
        [e.distractor for e in kept],
    )
    # spans need the tokenizer's character offsets, which only fast (Rust) tokenizers give
    segmented = all(e.segments is not None for e in kept) and bool(getattr(model.tokenizer, "is_fast", False))
    spans = Spans.from_segments(model, pairs, [e.segments or [] for e in kept]) if segmented else None
    return TaskPairs(task, pairs, metric, n, dropped, spans=spans)
