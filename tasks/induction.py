"""Induction: a random token sequence repeated; after the second copy's first k tokens the next token is
the first copy's (k+1)-th. The corrupted prompt's first copy is a different random sequence, so nothing can
be copied. Answer: the token to copy; distractor: a random token of the same pool. Metric: logit difference.

Tokens are drawn from single-token lowercase words (" apple"-like) so prompts are readable and re-tokenize
to themselves.
"""

from __future__ import annotations

import random
import re

from circuits.data import PromptPairs
from circuits.errors import InputError
from circuits.models.hooked import HookedModel
from circuits.task import TaskPairs

WORD = re.compile(r"^ [a-z]{3,10}$")


def word_tokens(model: HookedModel, limit: int = 2000) -> list[int]:
    """Ids of up to `limit` tokens that decode to ' word' and re-encode to themselves."""
    tok = model.tokenizer
    found: list[int] = []
    for i in range(min(model.d_vocab, len(tok))):
        text = str(tok.decode([i]))
        if WORD.match(text) and tok(text, add_special_tokens=False)["input_ids"] == [i]:
            found.append(i)
            if len(found) >= limit:
                break
    return found


def induction_pairs(model: HookedModel, n: int, *, length: int = 10, seed: int = 0) -> TaskPairs:
    """`n` pairs: [BOS] x_1..x_L x_1..x_k -> x_{k+1}, with k drawn from 2..L-1."""
    if length < 3:
        raise InputError(f"length must be >= 3, got {length}")
    pool = word_tokens(model)
    if len(pool) < 3 * length:
        raise InputError(f"{model.spec.name}: only {len(pool)} word tokens; need {3 * length}")
    rng = random.Random(seed)
    bos = [model.tokenizer.bos_token_id] if model.prepend_bos else []
    clean, corrupted, answers, distractors = [], [], [], []
    for _ in range(n):
        tokens = rng.sample(pool, 3 * length)
        first, fresh, others = tokens[:length], tokens[length : 2 * length], tokens[2 * length :]
        k = rng.randint(2, length - 1)
        clean.append(bos + first + first[:k])
        corrupted.append(bos + fresh + first[:k])
        answers.append(first[k])
        distractors.append(rng.choice(others))
    texts = [
        (str(model.tokenizer.decode(a)), str(model.tokenizer.decode(b))) for a, b in zip(clean, corrupted)
    ]
    pairs = PromptPairs.from_ids(model, clean, corrupted, answers, distractors, texts)
    return TaskPairs("induction", pairs, "logit_diff", n, 0)
