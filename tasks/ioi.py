"""Indirect object identification (Wang et al. 2022) as a seeded generator of prompt pairs.

Each clean prompt names two people (IO and S), repeats S, and ends where the next token is IO:
"When Mary and John went to the store, John gave a drink to" -> " Mary" (answer) vs " John" (distractor).
Orders: ABBA (IO first) and BABA (S first). Corruptions:
- `abc`: the repeated name is replaced by a third name, so the context no longer singles out IO;
- `s2_io_flip`: the repeated name becomes IO (as MIB's IOI corruption), so the answer flips.
Names are kept only if ' Name' is a single token for the model's tokenizer; pairs whose clean and corrupted
prompts differ in token length are dropped (and counted).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from circuits.data import PromptPairs
from circuits.models.hooked import HookedModel

NAMES = [
    "Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Sarah", "David", "Laura", "Michael", "Emma",
    "Daniel", "Kate", "Paul", "Lisa", "Mark", "Rachel", "Peter", "Susan", "Jack", "Emily", "Adam", "Helen",
    "Robert", "Linda", "Steven", "Karen", "George", "Amy", "Richard", "Jessica", "Thomas", "Nancy", "Kevin",
    "Rose", "Brian", "Julia", "Eric", "Grace", "Frank", "Claire", "Henry", "Sophie", "Ryan", "Lucy", "Sam",
]  # fmt: skip
PLACES = [
    "store",
    "park",
    "school",
    "office",
    "restaurant",
    "hospital",
    "station",
    "garden",
    "market",
    "beach",
]
OBJECTS = ["drink", "book", "ball", "letter", "bone", "gift", "key", "ring", "basket", "snack", "necklace"]

# {A} is the first-mentioned name, {B} the second, {S2} the repeated subject; the answer is the other one.
TEMPLATES = [
    "When {A} and {B} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "After {A} and {B} went to the {PLACE}, {S2} handed a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S2} gave a {OBJECT} to",
    "Then, {A} and {B} had a long argument. Afterwards {S2} said to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S2} decided to give it to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {S2} gave it to",
    "The {PLACE} {A} and {B} went to had a {OBJECT}. {S2} gave it to",
]

Corruption = Literal["abc", "s2_io_flip"]


@dataclass
class IOIPairs:
    """Generated pairs and how many requested examples could not be made with equal token lengths."""

    pairs: PromptPairs
    requested: int
    dropped: int


def single_token_names(model: HookedModel) -> list[str]:
    """Names whose ' Name' form is one token for this model's tokenizer."""
    keep = []
    for name in NAMES:
        ids = model.tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            keep.append(name)
    return keep


def ioi_pairs(
    model: HookedModel,
    n: int,
    *,
    corruption: Corruption = "abc",
    order: Literal["ABBA", "BABA", "mixed"] = "mixed",
    seed: int = 0,
    templates: list[str] | None = None,
) -> IOIPairs:
    """`n` IOI prompt pairs for `model`'s tokenizer (answer = IO, distractor = S, metric logit diff)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if corruption not in ("abc", "s2_io_flip"):
        raise ValueError(f"unknown corruption {corruption!r}; choose 'abc' or 's2_io_flip'")
    names = single_token_names(model)
    if len(names) < 3:
        raise ValueError(f"only {len(names)} IOI names are single tokens for {model.spec.name}; need 3")
    rng = random.Random(seed)
    templates = templates or TEMPLATES
    clean: list[str] = []
    corrupted: list[str] = []
    answers: list[str] = []
    distractors: list[str] = []
    dropped, attempts = 0, 0
    while len(clean) < n:
        attempts += 1
        if attempts > 20 * n:
            raise ValueError(
                f"could only make {len(clean)} of {n} equal-length IOI pairs for {model.spec.name}"
            )
        io, s, c = rng.sample(names, 3)
        template = rng.choice(templates)
        abba = order == "ABBA" or (order == "mixed" and rng.random() < 0.5)
        first, second = (io, s) if abba else (s, io)
        fill = {"PLACE": rng.choice(PLACES), "OBJECT": rng.choice(OBJECTS), "A": first, "B": second}
        clean_text = template.format(S2=s, **fill)
        corrupted_text = template.format(S2=c if corruption == "abc" else io, **fill)
        a, b = model.to_ids([clean_text, corrupted_text])
        if len(a) != len(b):
            dropped += 1
            continue
        clean.append(clean_text)
        corrupted.append(corrupted_text)
        answers.append(" " + io)
        distractors.append(" " + s)
    pairs = PromptPairs.from_strings(model, clean, corrupted, answers, distractors)
    return IOIPairs(pairs, n, dropped)
