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
import re
from typing import Literal

from circuits.errors import InputError
from circuits.models.hooked import HookedModel
from circuits.task import TaskPairs

from .common import Example, collect_pairs, single_tokens

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
# Wang et al.'s "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {S2} gave it to" is left out: SmolLM2
# solves it in only about 60% of cases (logit difference about 1, against 4-6 for every template below).
TEMPLATES = [
    "When {A} and {B} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "After {A} and {B} went to the {PLACE}, {S2} handed a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S2} gave a {OBJECT} to",
    "Then, {A} and {B} had a long argument. Afterwards {S2} said to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S2} decided to give it to",
    "The {PLACE} {A} and {B} went to had a {OBJECT}. {S2} gave it to",
]

Corruption = Literal["abc", "s2_io_flip"]


# the template's text around its names, as spans: before A, between A and B, between B and S2, after S2
LITERAL_SPANS = ("prefix", "and", "context", "action")


def segments(template: str, fill: dict[str, str], s2: str) -> list[tuple[str, str]]:
    """A filled template as named pieces (`circuits.spans.Spans.from_segments`): prefix, A, and, B, context,
    S2, action, concatenating to the clean prompt (its last token then becomes the span `end`)."""
    names = {"A": fill["A"], "B": fill["B"], "S2": s2}
    pieces: list[tuple[str, str]] = []
    literals = iter(LITERAL_SPANS)
    for i, part in enumerate(re.split(r"\{(A|B|S2)\}", template)):
        if i % 2:  # a name
            pieces.append((part, names[part]))
        else:
            name, text = next(literals), part.format(**fill)
            if text:
                pieces.append((name, text))
    return pieces


def ioi_pairs(
    model: HookedModel,
    n: int,
    *,
    corruption: Corruption = "abc",
    order: Literal["ABBA", "BABA", "mixed"] = "mixed",
    seed: int = 0,
    templates: list[str] | None = None,
) -> TaskPairs:
    """`n` IOI prompt pairs for `model`'s tokenizer (answer = IO, distractor = S, metric logit diff)."""
    if corruption not in ("abc", "s2_io_flip"):
        raise InputError(f"unknown corruption {corruption!r}; choose 'abc' or 's2_io_flip'")
    if order not in ("ABBA", "BABA", "mixed"):
        raise InputError(f"unknown order {order!r}; choose 'ABBA', 'BABA' or 'mixed'")
    names = single_tokens(model, NAMES)
    if len(names) < 3:
        raise InputError(f"only {len(names)} IOI names are single tokens for {model.spec.name}; need 3")
    chosen_templates = templates or TEMPLATES

    def propose(rng: random.Random) -> Example:
        io, s, c = rng.sample(names, 3)
        template = rng.choice(chosen_templates)
        abba = order == "ABBA" or (order == "mixed" and rng.random() < 0.5)
        first, second = (io, s) if abba else (s, io)
        fill = {"PLACE": rng.choice(PLACES), "OBJECT": rng.choice(OBJECTS), "A": first, "B": second}
        clean = template.format(S2=s, **fill)
        corrupted = template.format(S2=c if corruption == "abc" else io, **fill)
        return Example(clean, corrupted, " " + io, " " + s, segments(template, fill, s))

    return collect_pairs(model, "ioi", n, propose, "logit_diff", seed)


# Head classes of the IOI circuit in GPT-2 small (Wang et al. 2022), as layer.head.
WANG_2022_HEADS = {
    "name mover": ["9.6", "9.9", "10.0"],
    "S-inhibition": ["7.3", "7.9", "8.6", "8.10"],
    "induction": ["5.5", "5.8", "5.9", "6.9"],
    "duplicate token": ["0.1", "0.10", "3.0"],
    "previous token": ["2.2", "4.11"],
    "negative name mover": ["10.7", "11.10"],
    "backup name mover": ["9.0", "9.7", "10.1", "10.2", "10.6", "10.10", "11.2", "11.9"],
}


def head_class_overlap(heads: list[str]) -> dict[str, list[str]]:
    """For each Wang et al. head class, which of `heads` (layer.head names) belong to it."""
    return {name: [h for h in members if h in heads] for name, members in WANG_2022_HEADS.items()}
