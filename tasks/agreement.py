"""Subject-verb agreement across an attractor: "The author near the senators" -> " is" (not " are").

Clean prompts have a subject of one number and an attractor noun of the other; the corrupted prompt flips the
subject's number, which flips the verb the model should choose. Verb pairs: is/are, was/were, has/have.
Metric: logit difference between the verb agreeing with the clean subject and the other form.
"""

from __future__ import annotations

import random

from circuits.models.hooked import HookedModel
from circuits.task import TaskPairs

from .common import Example, collect_pairs

NOUNS = [
    ("author", "authors"), ("pilot", "pilots"), ("teacher", "teachers"), ("doctor", "doctors"),
    ("farmer", "farmers"), ("student", "students"), ("senator", "senators"), ("manager", "managers"),
    ("artist", "artists"), ("dancer", "dancers"), ("officer", "officers"), ("lawyer", "lawyers"),
    ("child", "children"), ("man", "men"), ("woman", "women"), ("player", "players"), ("driver", "drivers"),
    ("singer", "singers"), ("nurse", "nurses"), ("guard", "guards"), ("cook", "cooks"), ("king", "kings"),
]  # fmt: skip
PREPOSITIONS = ["near", "behind", "next to", "beside", "with", "like", "for"]
VERBS = [(" is", " are"), (" was", " were"), (" has", " have")]


def agreement_pairs(model: HookedModel, n: int, *, seed: int = 0) -> TaskPairs:
    """`n` agreement pairs (metric: logit difference of the agreeing verb over the other form)."""

    def propose(rng: random.Random) -> Example:
        subject, attractor = rng.sample(NOUNS, 2)
        plural = rng.random() < 0.5  # number of the clean subject; the attractor takes the other
        preposition = rng.choice(PREPOSITIONS)
        singular_verb, plural_verb = rng.choice(VERBS)
        tail = f" {preposition} the {attractor[0 if plural else 1]}"
        clean = f"The {subject[int(plural)]}{tail}"
        corrupted = f"The {subject[int(not plural)]}{tail}"
        answer, distractor = (plural_verb, singular_verb) if plural else (singular_verb, plural_verb)
        return Example(clean, corrupted, answer, distractor)

    return collect_pairs(model, "agreement", n, propose, "logit_diff", seed)
