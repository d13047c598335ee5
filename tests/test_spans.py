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


def test_marks_at_the_answers_recover_the_whole_ioi_schema(llama):
    """Read off the pairs alone (no language model): where clean and corrupted differ, plus the tokens
    equal to the answer or distractor (IOI's names): every span of the generator's template."""
    from circuits.spans import answer_marks

    task = ioi_pairs(llama, 16, seed=7)
    known = task.spans
    assert known is not None
    auto = Spans.from_differences(task.pairs, marks=answer_marks(task.pairs))
    start = ["bos"] if llama.prepend_bos else []
    assert auto.names == (*start, "s0.0", "s0.m1", "s0.1", "s0.m2", "s0.2", "d0", "s1", "end")
    pieces = {"s0.0": "prefix", "s0.m1": "A", "s0.1": "and", "s0.m2": "B", "s0.2": "context", "d0": "S2"}
    for name, part in {**pieces, "s1": "action", "end": "end"}.items():
        assert torch.equal(auto.positions(name), known.positions(part)), name


def test_salient_tokens_split_each_unchanged_run_and_marks_must_agree(llama):
    task = ioi_pairs(llama, 6, seed=8)
    saliency = torch.rand(task.pairs.clean.shape)
    auto = Spans.from_differences(task.pairs, saliency=saliency, salient=1)
    assert [n for n in auto.names if ".m" in n] == ["s0.m1", "s1.m1"]
    for row in range(6):  # the marked token is its run's most salient one
        inside = auto.index[row] == auto.names.index("s0.m1")
        run = (auto.index[row] >= auto.names.index("s0.0")) & (auto.index[row] <= auto.names.index("s0.1"))
        assert float(saliency[row][inside].max()) == float(saliency[row][run].max())
    uneven = torch.zeros_like(task.pairs.clean, dtype=torch.bool)
    uneven[0, 1] = True  # one prompt with a mark its others lack
    with pytest.raises(InputError, match="numbers of marked tokens"):
        Spans.from_differences(task.pairs, marks=uneven)


def test_token_saliency_is_gradient_times_input_by_finite_differences(llama):
    """|e_p . dM/de_p| against a central difference of M along e_p (the input at p scaled by 1 +- eps)."""
    from circuits.metrics import logit_diff
    from circuits.spans import token_saliency

    pairs = ioi_pairs(llama, 3, seed=9).pairs
    saliency = token_saliency(llama, pairs)
    eps = 1e-3
    for row, p in ((0, 1), (1, 3), (2, int(pairs.lengths[2]) - 1)):
        one = pairs[row : row + 1]

        def scaled(factor: float, p: int = p, one=one):
            def hook(x):
                x = x.clone()
                x[:, p] *= factor
                return x

            with torch.no_grad(), llama.hooks([(llama.input_hook, hook)]):
                return logit_diff(llama(one.clean, one.attention_mask), one).double()

        expected = abs(float((scaled(1 + eps) - scaled(1 - eps)) / (2 * eps)))
        assert float(saliency[row, p]) == pytest.approx(expected, rel=2e-2, abs=1e-6)
    assert bool((saliency[2, int(pairs.lengths[2]) :] == 0).all())  # padding
