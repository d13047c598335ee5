"""Spans (position-aware circuits, step 1): the IOI generator names its prompts' spans, the schema read
off clean / corrupted differences recovers them where the differences define them, and a malformed
schema is refused."""

import pytest
import torch

from circuits.errors import InputError
from circuits.spans import Spans
from tasks.ioi import ioi_pairs


def test_ioi_spans_follow_the_template(llama):
    task = ioi_pairs(llama, 12, seed=3)
    spans = task.spans
    assert spans is not None
    start = ["bos"] if llama.prepend_bos else []
    assert spans.names == (*start, "prefix", "A", "and", "B", "context", "S2", "action", "end")
    spans.check_fits(task.pairs)
    lengths = spans.lengths
    for name in ("A", "B", "S2", "end"):  # one-token names, the last token alone
        assert bool((lengths[:, spans.names.index(name)] == 1).all()), name
    pairs = task.pairs
    for row in range(len(pairs)):  # the repeated name is the one token the abc corruption changes
        differs = (pairs.clean[row] != pairs.corrupted[row]).nonzero()[:, 0].tolist()
        assert differs == spans.positions("S2")[row].nonzero()[:, 0].tolist()
        tokens = pairs.clean[row]
        a, b, s2 = (int(tokens[spans.positions(n)[row]][0]) for n in ("A", "B", "S2"))
        assert (
            s2 in (a, b)
            and int(pairs.distractor[row]) == s2
            and int(pairs.answer[row]) == ({a, b} - {s2}).pop()
        )


def test_spans_from_differences_recover_the_generators_boundaries(llama):
    task = ioi_pairs(llama, 12, seed=4)
    auto, known = Spans.from_differences(task.pairs), task.spans
    assert known is not None
    start = ["bos"] if llama.prepend_bos else []
    assert auto.names == (*start, "s0", "d0", "s1", "end")
    same = {"s0": ("prefix", "A", "and", "B", "context"), "d0": ("S2",), "s1": ("action",), "end": ("end",)}
    for name, parts in same.items():
        union = torch.stack([known.positions(p) for p in parts]).any(0)
        assert torch.equal(auto.positions(name), union), name


def test_different_patterns_of_differences_share_no_schema(llama):
    first = ioi_pairs(llama, 2, seed=5).pairs
    flipped = ioi_pairs(llama, 2, seed=5, corruption="s2_io_flip").pairs
    assert Spans.from_differences(first).names == Spans.from_differences(flipped).names
    shuffled = first.take(torch.tensor([0, 1]))
    shuffled.corrupted[1] = shuffled.clean[1]  # a pair with no difference at all
    with pytest.raises(InputError, match="differ in different places"):
        Spans.from_differences(shuffled)


@pytest.mark.parametrize(
    "names, index, match",
    [
        (("a", "end"), [[0, 1, 0]], "order"),
        (("a", "end"), [[0, 1, 1]], "alone"),
        (("a", "b"), [[0, 1]], "ending with 'end'"),
        (("a", "end"), [[0, -1, 1]], "padding"),
        (("a", "end"), [[0, 2]], "must lie in"),
    ],
)
def test_malformed_spans_are_refused(names, index, match):
    with pytest.raises(InputError, match=match):
        Spans(names, torch.tensor(index))


def test_a_slow_tokenizer_gives_no_spans_but_still_the_pairs(llama, monkeypatch):
    monkeypatch.setattr(type(llama.tokenizer), "is_fast", property(lambda self: False))
    task = ioi_pairs(llama, 3, seed=6)
    assert task.spans is None and len(task.pairs) == 3
    with pytest.raises(InputError, match="no character offsets"):
        Spans.from_segments(llama, task.pairs, [[("x", "a")]] * 3)
