"""Capital cities: "The capital of France is" -> " Paris"; corrupted: another country, whose capital is the
distractor. Metric: logit difference. Countries whose name or capital is not one token are dropped."""

from __future__ import annotations

import random

from circuits.errors import InputError
from circuits.models.hooked import HookedModel
from circuits.task import TaskPairs

from .common import Example, collect_pairs, single_tokens

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Canada": "Ottawa",
    "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Portugal": "Lisbon", "Turkey": "Ankara", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana",
    "Chile": "Santiago", "Thailand": "Bangkok", "Belgium": "Brussels", "Hungary": "Budapest",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Iran": "Tehran", "Iraq": "Baghdad", "Syria": "Damascus",
    "Australia": "Canberra", "Vietnam": "Hanoi", "Philippines": "Manila", "Indonesia": "Jakarta",
    "Ukraine": "Kyiv", "England": "London", "Scotland": "Edinburgh", "Israel": "Jerusalem",
}  # fmt: skip
TEMPLATES = ["The capital of {} is", "The capital city of {} is", "{} has its capital in"]


def capital_pairs(model: HookedModel, n: int, *, seed: int = 0) -> TaskPairs:
    """`n` capital-city pairs (answer: the capital, distractor: the corrupted country's capital)."""
    capitals = set(single_tokens(model, list(CAPITALS.values())))
    countries = [c for c, capital in CAPITALS.items() if capital in capitals]
    if len(countries) < 2:
        raise InputError(f"fewer than two capitals are single tokens for {model.spec.name}")

    def propose(rng: random.Random) -> Example:
        country, other = rng.sample(countries, 2)
        template = rng.choice(TEMPLATES)
        return Example(
            template.format(country), template.format(other), " " + CAPITALS[country], " " + CAPITALS[other]
        )

    return collect_pairs(model, "capitals", n, propose, "logit_diff", seed)
