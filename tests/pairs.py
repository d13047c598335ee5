"""A few IOI-style prompt pairs the tiny tokenizer encodes with single-token names."""

from circuits.data import PromptPairs

PAIRS = [
    (
        "When Mary and John went to the store, John gave a drink to",
        "When Mary and John went to the store, Alice gave a drink to",
        " Mary",
        " John",
    ),
    (
        "When Alice and Bob went to the store, Bob gave a drink to",
        "When Alice and Bob went to the store, Tom gave a drink to",
        " Alice",
        " Bob",
    ),
    ("Then Tom said hello to", "Then Anna said hello to", " Tom", " Anna"),
]


def make_pairs(model):
    clean, corrupted, answers, distractors = zip(*PAIRS)
    return PromptPairs.from_strings(model, clean, corrupted, answers, distractors)
