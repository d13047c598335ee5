"""`PromptPairs`: clean / corrupted prompts as token ids with the answer and distractor of each pair."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from circuits.distributed import process_chunks
from circuits.errors import CircuitsWarning, InputError
from circuits.models.hooked import HookedModel


@dataclass
class PromptPairs:
    """N prompt pairs, right-padded to a common length P.

    Attributes:
        clean, corrupted: [N, P] token ids; a pair has the same length in both.
        lengths: [N] real (unpadded) length; the metric reads position lengths - 1.
        answer, distractor: [N] token ids of the correct and the contrasting next token.
        pad_id: id used for padding.
        metric: what the pairs are scored with (a name in `circuits.metrics.METRICS` or a callable), set
            by the task that made them; every function taking pairs uses it unless given another metric
            (`metric_for`). None: the logit difference.
        tokenizer: the signature of the tokenizer that made the ids (`HookedModel.tokenizer_signature`,
            set by `from_strings` / `from_ids`); a model with another tokenizer refuses the pairs.
    """

    clean: Tensor
    corrupted: Tensor
    lengths: Tensor
    answer: Tensor
    distractor: Tensor
    pad_id: int = 0
    texts: list[tuple[str, str]] = field(default_factory=list, repr=False)
    metric: str | Callable[..., Tensor] | None = None
    tokenizer: tuple[int, tuple[int, ...]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("clean", "corrupted", "lengths", "answer", "distractor"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise InputError(f"PromptPairs.{name} must be a tensor, got {type(value).__name__}")
            if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
                raise InputError(
                    f"PromptPairs.{name} must hold integer token ids / lengths, got dtype {value.dtype}"
                )
        if self.clean.dim() != 2:
            raise InputError(f"clean must be [N, P] token ids, got shape {tuple(self.clean.shape)}")
        n = self.clean.shape[0]
        if n == 0:
            raise InputError("PromptPairs is empty: give at least one prompt pair")
        if self.clean.shape != self.corrupted.shape:
            raise InputError(
                f"clean {tuple(self.clean.shape)} and corrupted {tuple(self.corrupted.shape)} differ"
            )
        for name in ("lengths", "answer", "distractor"):
            if getattr(self, name).shape != (n,):
                raise InputError(f"{name} must have shape ({n},), got {tuple(getattr(self, name).shape)}")
        if int(self.lengths.min()) < 1 or int(self.lengths.max()) > self.clean.shape[1]:
            raise InputError(f"lengths must lie in [1, {self.clean.shape[1]}] (the number of positions)")

    def metric_for(self, metric: str | Callable[..., Tensor] | None) -> str | Callable[..., Tensor]:
        """`metric` if given, else the pairs' own (their task's), else the logit difference."""
        if metric is not None:
            return metric
        return "logit_diff" if self.metric is None else self.metric

    def check_fits(self, model: HookedModel) -> None:
        """Raise `InputError` unless every token id is in the model's vocabulary and every prompt fits
        its context window, and, for pairs that know their tokenizer, unless it is the model's."""
        if self.tokenizer is not None and self.tokenizer != model.tokenizer_signature:
            raise InputError(
                f"these prompt pairs were tokenized by another tokenizer than {model.spec.name}'s "
                f"(vocabulary {self.tokenizer[0]} against {model.tokenizer_signature[0]}, or other ids for "
                "the same text): their ids mean other text for this model. Make the pairs again with it "
                "(PromptPairs.from_strings(model, ...) or make_task(model, ...))"
            )
        vocab = model.d_vocab
        for name in ("clean", "corrupted", "answer", "distractor"):
            ids = getattr(self, name)
            bad = ((ids < 0) | (ids >= vocab)).nonzero()
            if bad.numel():
                where = f"pair {int(bad[0, 0])}"
                raise InputError(
                    f"pairs.{name} of {where} is token id {int(ids[tuple(bad[0])])}, outside the vocabulary "
                    f"[0, {vocab}) of {model.spec.name}"
                )
        longest = int(self.lengths.max())
        if model.n_ctx is not None and longest > model.n_ctx:
            pair = int(self.lengths.argmax())
            raise InputError(
                f"pair {pair} is {longest} tokens long, more than the {model.n_ctx} positions "
                f"{model.spec.name} can attend over; shorten the prompts"
            )

    def __len__(self) -> int:
        return self.clean.shape[0]

    @property
    def n_positions(self) -> int:
        return self.clean.shape[1]

    @property
    def attention_mask(self) -> Tensor:
        """[N, P] ones on real tokens, zeros on padding."""
        return (torch.arange(self.n_positions)[None, :] < self.lengths[:, None]).long()

    def __getitem__(self, index: slice) -> PromptPairs:
        return self.take(torch.arange(len(self))[index])

    def take(self, indices: Tensor) -> PromptPairs:
        """The pairs at `indices` [M] (repeats allowed, e.g. a bootstrap resample), trimmed to the longest."""
        rows = indices.long()
        lengths = self.lengths[rows]
        width = int(lengths.max())
        return PromptPairs(
            self.clean[rows, :width],
            self.corrupted[rows, :width],
            lengths,
            self.answer[rows],
            self.distractor[rows],
            self.pad_id,
            [self.texts[i] for i in rows.tolist()] if self.texts else [],
            self.metric,
            self.tokenizer,
        )

    def batches(self, batch_size: int) -> Iterator[PromptPairs]:
        """Consecutive batches of at most `batch_size` pairs, each trimmed to its longest pair."""
        check_count(batch_size, "batch_size")
        for start in range(0, len(self), batch_size):
            yield self[start : start + batch_size]

    def process_batches(
        self, batch_size: int, device: torch.device, desc: str, quiet: bool = False
    ) -> Iterator[tuple[str, PromptPairs]]:
        """This process's batches (all of them, unless under torchrun), each with where it stands
        ("batch 3 (pairs 24-31)", for error messages), and a progress bar on the main process."""
        check_count(batch_size, "batch_size")
        for index, chunk in enumerate(process_chunks(len(self), batch_size, device, desc=desc, quiet=quiet)):
            yield f"batch {index} (pairs {chunk.start}-{chunk.stop - 1})", self[chunk.start : chunk.stop]

    def repeat(self, times: int) -> PromptPairs:
        """The pairs tiled `times` times along the batch (row r * N + i is pair i), e.g. for IG steps."""
        return PromptPairs(
            self.clean.repeat(times, 1),
            self.corrupted.repeat(times, 1),
            self.lengths.repeat(times),
            self.answer.repeat(times),
            self.distractor.repeat(times),
            self.pad_id,
            metric=self.metric,
            tokenizer=self.tokenizer,
        )

    def to(self, device: torch.device | str) -> PromptPairs:
        return PromptPairs(
            self.clean.to(device),
            self.corrupted.to(device),
            self.lengths.to(device),
            self.answer.to(device),
            self.distractor.to(device),
            self.pad_id,
            self.texts,
            self.metric,
            self.tokenizer,
        )

    @classmethod
    def from_strings(
        cls,
        model: HookedModel,
        clean: Sequence[str],
        corrupted: Sequence[str],
        answers: Sequence[str],
        distractors: Sequence[str],
    ) -> PromptPairs:
        """Tokenise pairs with the model's tokenizer; answers must be single tokens (e.g. ' Mary').

        Raises ValueError naming the pair whose clean and corrupted prompts differ in token length, or
        whose answer is not one token.
        """
        _check_counts(clean, corrupted, answers, distractors)
        if not clean:
            raise InputError("no prompt pairs given")
        clean_ids, corrupted_ids = model.to_ids(clean), model.to_ids(corrupted)
        for i, (a, b) in enumerate(zip(clean_ids, corrupted_ids)):
            if len(a) != len(b):
                raise InputError(
                    f"pair {i}: clean prompt is {len(a)} tokens, corrupted is {len(b)}; positions must "
                    f"match.\n  clean: {clean[i]!r}\n  corrupted: {corrupted[i]!r}"
                )
        warn_unspaced(
            model, [x for c, a, d in zip(clean, answers, distractors) if not c.endswith(" ") for x in (a, d)]
        )
        answer_ids, distractor_ids = [], []
        for i, (answer, distractor) in enumerate(zip(answers, distractors)):
            try:
                answer_ids.append(model.single_token_id(answer))
                distractor_ids.append(model.single_token_id(distractor))
            except ValueError as err:
                raise InputError(f"pair {i}: {err}") from None
        return cls.from_ids(
            model, clean_ids, corrupted_ids, answer_ids, distractor_ids, list(zip(clean, corrupted))
        )

    @classmethod
    def from_ids(
        cls,
        model: HookedModel,
        clean: Sequence[Sequence[int]],
        corrupted: Sequence[Sequence[int]],
        answers: Sequence[int],
        distractors: Sequence[int],
        texts: list[tuple[str, str]] | None = None,
    ) -> PromptPairs:
        """Pairs from token ids (BOS included if the model wants it); pads with the tokenizer's pad id."""
        _check_counts(clean, corrupted, answers, distractors)
        for i, (a, b) in enumerate(zip(clean, corrupted)):
            if len(a) != len(b):
                raise InputError(
                    f"pair {i}: clean has {len(a)} tokens, corrupted {len(b)}; positions must match"
                )
            if len(a) == 0:
                raise InputError(f"pair {i}: the prompt has no tokens")
        vocab = model.d_vocab
        for name, rows in (("clean prompt", clean), ("corrupted prompt", corrupted)):
            for i, row in enumerate(rows):
                for t in row:
                    _check_token(t, vocab, f"{name} {i}")
        for name, ids in (("answer", answers), ("distractor", distractors)):
            for i, t in enumerate(ids):
                _check_token(t, vocab, f"{name} of pair {i}")
        same = [i for i, (a, d) in enumerate(zip(answers, distractors)) if int(a) == int(d)]
        if same:
            warnings.warn(
                f"{len(same)} pair(s) have the same answer and distractor token (first: pair {same[0]}); "
                "their logit difference is 0 whatever the model does",
                CircuitsWarning,
                stacklevel=2,
            )
        pad = model.tokenizer.pad_token_id
        pad = model.tokenizer.eos_token_id if pad is None else pad
        pad = 0 if pad is None else int(pad)
        return cls(
            _pad([list(r) for r in clean], pad),
            _pad([list(r) for r in corrupted], pad),
            torch.tensor([len(a) for a in clean]),
            torch.tensor(list(answers)),
            torch.tensor(list(distractors)),
            pad,
            texts or [],
            tokenizer=model.tokenizer_signature,
        )


def warn_unspaced(model: HookedModel, answers: Sequence[str]) -> None:
    """A `CircuitsWarning` when answers lack the leading space their tokenizer gives a next word."""
    unspaced = sorted({a for a in answers if model.missing_leading_space(a)})
    if unspaced:
        warnings.warn(
            f"{len(unspaced)} answer(s) without a leading space (first: {unspaced[0]!r}), though "
            f"{' ' + unspaced[0]!r} is one token for {model.spec.name}: after a word the model predicts the "
            "spaced token, so the metric reads an unlikely one. Write answers as ' Mary' unless the prompt "
            "ends with a space",
            CircuitsWarning,
            stacklevel=3,
        )


def check_pairs(model: HookedModel, pairs: object, name: str = "pairs") -> PromptPairs:
    """`pairs` if it is `PromptPairs` that fit `model` (see `PromptPairs.check_fits`), else `InputError`."""
    if not isinstance(pairs, PromptPairs):
        raise InputError(
            f"{name} must be PromptPairs (PromptPairs.from_strings, or a task's .pairs), got "
            f"{type(pairs).__name__}"
        )
    pairs.check_fits(model)
    return pairs


def _check_counts(*columns: Sequence[object]) -> None:
    """As many clean prompts, corrupted prompts, answers and distractors, else `InputError`."""
    if len({len(c) for c in columns}) != 1:
        clean, corrupted, answers, distractors = (len(c) for c in columns)
        raise InputError(
            f"need as many clean ({clean}), corrupted ({corrupted}), answers ({answers}) and distractors "
            f"({distractors})"
        )


def check_count(value: object, name: str) -> int:
    """A whole number >= 1 (batch sizes, rows per pass), else `InputError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def _check_token(t: object, vocab: int, where: str) -> None:
    """An integer token id (Python or numpy / torch integer scalar) inside [0, vocab)."""
    if isinstance(t, Tensor):
        t = t.item() if t.numel() == 1 and not t.dtype.is_floating_point else repr(t)
    if isinstance(t, bool) or not hasattr(t, "__index__"):
        raise InputError(f"{where}: token id {t!r} is not an integer")
    if not 0 <= t.__index__() < vocab:  # type: ignore[union-attr]
        raise InputError(f"{where}: token id {t} is outside the vocabulary [0, {vocab})")


def _pad(rows: list[list[int]], pad: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
