"""`PromptPairs`: clean / corrupted prompts as token ids with the answer and distractor of each pair."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from circuits.distributed import process_chunks
from circuits.errors import CircuitsWarning, InputError
from circuits.models.hooked import HookedModel

# PromptPairs' per-pair tensors (sliced, tiled and moved together), and those that may be None
ROW_FIELDS = (
    "clean",
    "corrupted",
    "lengths",
    "answer",
    "distractor",
    "corrupted_lengths",
    "answer_tokens",
    "answer_offset",
    "span_index",
)
OPTIONAL_ROW_FIELDS = ("corrupted_lengths", "answer_tokens", "answer_offset", "span_index")


@dataclass
class PromptPairs:
    """N prompt pairs, right-padded to a common length P.

    Attributes:
        clean, corrupted: [N, P] token ids, each prompt run under its own mask and positions.
        lengths: [N] real (unpadded) length of the clean prompts.
        answer, distractor: [N] token ids of the correct and the contrasting next token, read at
            `read_positions` (the last real position, unless the answers are several tokens long).
        pad_id: id used for padding.
        corrupted_lengths: [N] real length of the corrupted prompts where some differ from the clean ones
            (None: every pair has one length). Positions then correspond by `alignment`.
        start_tokens: how many leading positions are start tokens (1 when the model prepends BOS): they
            correspond to each other whatever the prompts' lengths.
        answer_tokens: [N, A] whole answers when some are several tokens long, -1 after each answer's end
            (None: single-token answers). Both prompts then end with the answer's tokens but its last
            (teacher forcing), so that a metric can read the probability of every answer token.
        answer_offset: [N] how many positions before the last one the answer and the distractor branch
            (their first differing token, `answer` / `distractor`), with answers of several tokens.
        span_index: [N, P] the span of each clean position, -1 on padding (`circuits.spans.Spans.index`),
            for scores per span (`Spans.attach`); None: positions are summed.
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
    corrupted_lengths: Tensor | None = None
    start_tokens: int = 0
    answer_tokens: Tensor | None = field(default=None, repr=False)
    answer_offset: Tensor | None = field(default=None, repr=False)
    span_index: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ROW_FIELDS:
            value = getattr(self, name)
            if value is None and name in OPTIONAL_ROW_FIELDS:
                continue
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
        for name in ("lengths", "answer", "distractor", "corrupted_lengths", "answer_offset"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise InputError(f"{name} must have shape ({n},), got {tuple(value.shape)}")
        for name in ("lengths", "corrupted_lengths"):
            value = getattr(self, name)
            if value is not None and (int(value.min()) < 1 or int(value.max()) > self.clean.shape[1]):
                raise InputError(f"{name} must lie in [1, {self.clean.shape[1]}] (the number of positions)")
        if self.corrupted_lengths is not None and torch.equal(self.corrupted_lengths, self.lengths):
            self.corrupted_lengths = None  # one length per pair: positions correspond one to one
        if self.span_index is not None and self.span_index.shape != self.clean.shape:
            raise InputError(
                f"span_index must be [N, P] like clean {tuple(self.clean.shape)}, got "
                f"{tuple(self.span_index.shape)}"
            )
        if (self.answer_tokens is None) != (self.answer_offset is None):
            raise InputError("answer_tokens and answer_offset come together (answers of several tokens)")
        if self.answer_tokens is not None and self.answer_offset is not None:
            if self.answer_tokens.dim() != 2 or self.answer_tokens.shape[0] != n:
                raise InputError(f"answer_tokens must be [{n}, A], got {tuple(self.answer_tokens.shape)}")
            room = torch.minimum(self.lengths, self.corrupted_real_lengths) - self.answer_lengths
            offset = self.answer_offset
            if int(offset.min()) < 0 or bool(torch.greater_equal(offset, self.answer_lengths).any()):
                raise InputError("answer_offset must lie in [0, the answer's length)")
            if bool((room < 0).any()):
                raise InputError("a prompt is shorter than the answer tokens it should end with")

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
        """[N, P] ones on the clean prompts' real tokens, zeros on padding."""
        return _mask(self.lengths, self.n_positions)

    @property
    def corrupted_real_lengths(self) -> Tensor:
        """[N] real length of the corrupted prompts."""
        return self.lengths if self.corrupted_lengths is None else self.corrupted_lengths

    @property
    def corrupted_mask(self) -> Tensor:
        """[N, P] ones on the corrupted prompts' real tokens, zeros on padding."""
        return _mask(self.corrupted_real_lengths, self.n_positions)

    @property
    def aligned(self) -> bool:
        """True when some pair's prompts differ in length, so that positions correspond by `alignment`."""
        return self.corrupted_lengths is not None

    @property
    def alignment(self) -> Tensor:
        """[N, P] for each clean position, the corrupted position it corresponds to, or -1.

        The rule: the prompts' ends correspond (last to last, and so on backwards) and so do their
        `start_tokens`; a clean position that falls between, which exists when the clean prompt is the
        longer one, has no counterpart (-1), and neither has padding. With equal lengths it is the identity.
        """
        p = torch.arange(self.n_positions, device=self.lengths.device)[None, :]
        clean, corrupted = self.lengths[:, None], self.corrupted_real_lengths[:, None]
        from_end = p - clean + corrupted
        start = p < self.start_tokens
        matched = torch.where(start, p, from_end)
        ok = (p < clean) & (matched < corrupted) & (start | (from_end >= self.start_tokens))
        return torch.where(ok, matched, torch.full_like(matched, -1))

    def align(self, corrupted: Tensor, clean: Tensor) -> Tensor:
        """Corrupted-run values [b, P, ...] moved to the clean positions they correspond to (`alignment`),
        with the clean run's values [b, P, ...] where a clean position has no counterpart. Rows: repeats of
        these pairs. Without `aligned`, `corrupted` itself."""
        if not self.aligned:
            return corrupted
        rows, n_pos = corrupted.shape[:2]
        where = self.alignment[:, :n_pos].to(corrupted.device).repeat(rows // len(self), 1)
        picked = corrupted[torch.arange(rows, device=corrupted.device)[:, None], where.clamp(min=0)]
        keep = (where >= 0).reshape(*where.shape, *[1] * (corrupted.dim() - 2))
        return torch.where(keep, picked, clean.to(picked))

    @property
    def read_positions(self) -> Tensor:
        """[N] the clean position whose next-token logits the metrics read: the last real one, or with
        answers of several tokens, where the answer and the distractor branch."""
        offset = 0 if self.answer_offset is None else self.answer_offset
        return self.lengths - 1 - offset

    @property
    def answer_lengths(self) -> Tensor:
        """[N] tokens in each answer (1 without `answer_tokens`)."""
        if self.answer_tokens is None:
            return torch.ones_like(self.lengths)
        return (self.answer_tokens >= 0).sum(1)

    def corrupted_side(self) -> PromptPairs:
        """The pairs seen from the corrupted prompts (clean and corrupted swapped, the same answers), for
        running the corrupted prompts and reading their metric where they end."""
        return replace(
            self,
            clean=self.corrupted,
            corrupted=self.clean,
            lengths=self.corrupted_real_lengths,
            corrupted_lengths=None if self.corrupted_lengths is None else self.lengths,
            texts=[(b, a) for a, b in self.texts],
            span_index=None,  # the spans are the clean prompts'
        )

    def __getitem__(self, index: slice) -> PromptPairs:
        return self.take(torch.arange(len(self))[index])

    def take(self, indices: Tensor) -> PromptPairs:
        """The pairs at `indices` [M] (repeats allowed, e.g. a bootstrap resample), trimmed to the longest."""
        rows = indices.long()
        width = int(torch.maximum(self.lengths[rows], self.corrupted_real_lengths[rows]).max())
        picked = self._rows(lambda t: t[rows])
        for name in ("clean", "corrupted", "span_index"):
            if picked[name] is not None:
                picked[name] = picked[name][:, :width]
        return replace(self, **picked, texts=[self.texts[i] for i in rows.tolist()] if self.texts else [])

    def _rows(self, fn: Callable[[Tensor], Tensor]) -> dict[str, Any]:
        """`fn` applied to every per-pair tensor (`ROW_FIELDS`), by field name."""
        return {name: None if (t := getattr(self, name)) is None else fn(t) for name in ROW_FIELDS}

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
        tiled = self._rows(lambda t: t.repeat(times, *[1] * (t.dim() - 1)))
        return replace(self, **tiled, texts=self.texts * times)

    def to(self, device: torch.device | str) -> PromptPairs:
        return replace(self, **self._rows(lambda t: t.to(device)))

    @classmethod
    def from_strings(
        cls,
        model: HookedModel,
        clean: Sequence[str],
        corrupted: Sequence[str],
        answers: Sequence[str],
        distractors: Sequence[str],
    ) -> PromptPairs:
        """Tokenise pairs with the model's tokenizer (see `from_ids`): prompts of any token lengths, answers
        and distractors of one token (' Mary') or several (' Buenos Aires')."""
        _check_counts(clean, corrupted, answers, distractors)
        if not clean:
            raise InputError("no prompt pairs given")
        warn_unspaced(
            model, [x for c, a, d in zip(clean, answers, distractors) if not c.endswith(" ") for x in (a, d)]
        )
        answer_ids: list[list[int]] = []
        distractor_ids: list[list[int]] = []
        for i, (answer, distractor) in enumerate(zip(answers, distractors)):
            for name, text, out in (
                ("answer", answer, answer_ids),
                ("distractor", distractor, distractor_ids),
            ):
                if not isinstance(text, str) or not text:
                    raise InputError(f"pair {i}: the {name} must be a non-empty string, got {text!r}")
                out.append(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        return cls.from_ids(
            model,
            model.to_ids(clean),
            model.to_ids(corrupted),
            answer_ids,
            distractor_ids,
            list(zip(clean, corrupted)),
        )

    @classmethod
    def from_ids(
        cls,
        model: HookedModel,
        clean: Sequence[Sequence[int]],
        corrupted: Sequence[Sequence[int]],
        answers: Sequence[int | Sequence[int]],
        distractors: Sequence[int | Sequence[int]],
        texts: list[tuple[str, str]] | None = None,
    ) -> PromptPairs:
        """Pairs from token ids (BOS included if the model wants it); pads with the tokenizer's pad id.

        Clean and corrupted prompts may differ in length: positions then correspond by `alignment` (ends
        and start tokens). An answer or distractor is one token id or a sequence of them. When some are
        several tokens long, both prompts of every pair get the answer's tokens but its last appended
        (teacher forcing); `answer` / `distractor` become the first tokens where the two differ, and the
        next-token metrics read the position where they branch (`read_positions`), so that `logit_diff`
        compares the two continuations where they part and `answer_logprob` scores the whole answer.
        """
        _check_counts(clean, corrupted, answers, distractors)
        vocab = model.d_vocab
        for name, rows in (("clean prompt", clean), ("corrupted prompt", corrupted)):
            for i, row in enumerate(rows):
                if len(row) == 0:
                    raise InputError(f"{name} {i} has no tokens")
                for t in row:
                    _check_token(t, vocab, f"{name} {i}")
        answer_seqs = [_token_sequence(a, f"answer of pair {i}", vocab) for i, a in enumerate(answers)]
        distractor_seqs = [
            _token_sequence(d, f"distractor of pair {i}", vocab) for i, d in enumerate(distractors)
        ]
        clean_rows, corrupted_rows = [list(r) for r in clean], [list(r) for r in corrupted]
        several = any(len(a) > 1 for a in answer_seqs + distractor_seqs)
        branch = [
            branch_index(a, d, i) if several else 0
            for i, (a, d) in enumerate(zip(answer_seqs, distractor_seqs))
        ]
        if several:
            for row, answer in zip(clean_rows + corrupted_rows, answer_seqs + answer_seqs):
                row += answer[:-1]
        first = [int(a[k]) for a, k in zip(answer_seqs, branch)]
        second = [int(d[k]) for d, k in zip(distractor_seqs, branch)]
        same = [i for i, (a, d) in enumerate(zip(answer_seqs, distractor_seqs)) if a == d]
        if same:
            warnings.warn(
                f"{len(same)} pair(s) have the same answer and distractor (first: pair {same[0]}); their "
                "logit difference is 0 whatever the model does",
                CircuitsWarning,
                stacklevel=2,
            )
        pad = model.tokenizer.pad_token_id
        pad = model.tokenizer.eos_token_id if pad is None else pad
        pad = 0 if pad is None else int(pad)
        width = max(len(r) for r in clean_rows + corrupted_rows)
        return cls(
            _pad(clean_rows, pad, width),
            _pad(corrupted_rows, pad, width),
            torch.tensor([len(r) for r in clean_rows]),
            torch.tensor(first),
            torch.tensor(second),
            pad,
            texts or [],
            tokenizer=model.tokenizer_signature,
            corrupted_lengths=torch.tensor([len(r) for r in corrupted_rows]),
            start_tokens=int(model.prepend_bos),
            answer_tokens=_pad(answer_seqs, -1, max(len(a) for a in answer_seqs)) if several else None,
            answer_offset=torch.tensor([len(a) - 1 - k for a, k in zip(answer_seqs, branch)])
            if several
            else None,
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


def as_pairs(data: object, name: str = "pairs") -> PromptPairs:
    """`data` if it is `PromptPairs`, the pairs of a task (`circuits.TaskPairs`, whose pairs carry the task's
    metric) if it is one, else `InputError`."""
    if isinstance(data, PromptPairs):
        return data
    inner = getattr(data, "pairs", None)
    if isinstance(inner, PromptPairs):
        return inner
    raise InputError(
        f"{name} must be PromptPairs (PromptPairs.from_strings) or a task (make_task, load_pairs), got "
        f"{type(data).__name__}"
    )


def check_pairs(model: HookedModel, pairs: object, name: str = "pairs") -> PromptPairs:
    """The `PromptPairs` of `pairs` (`as_pairs`) if they fit `model` (`PromptPairs.check_fits`), else
    `InputError`."""
    found = as_pairs(pairs, name)
    found.check_fits(model)
    return found


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


def _mask(lengths: Tensor, n_positions: int) -> Tensor:
    """[N, P] ones on the first lengths[i] positions of each row."""
    return (torch.arange(n_positions, device=lengths.device)[None, :] < lengths[:, None]).long()


def _pad(rows: list[list[int]], pad: int, width: int) -> Tensor:
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def _token_sequence(value: object, where: str, vocab: int) -> list[int]:
    """One token id, or a non-empty sequence of them, as a list of ints checked against the vocabulary."""
    if isinstance(value, str | bytes):
        raise InputError(
            f"{where}: give token ids, not text ({value!r}); PromptPairs.from_strings takes text"
        )
    single = not hasattr(value, "__len__") or (isinstance(value, Tensor) and value.dim() == 0)
    ids = [value] if single else list(value)  # type: ignore[call-overload]
    if not ids:
        raise InputError(f"{where} has no tokens")
    for t in ids:
        _check_token(t, vocab, where)
    return [int(t) for t in ids]  # type: ignore[call-overload, arg-type]


def branch_index(answer: list[int], distractor: list[int], pair: int) -> int:
    """Index of the first token where `answer` and `distractor` differ (the last one if they are equal);
    `InputError` when one continues the other, so that they never part."""
    for k, (a, d) in enumerate(zip(answer, distractor)):
        if a != d:
            return k
    if len(answer) != len(distractor):
        shorter, longer = sorted((answer, distractor), key=len)
        raise InputError(
            f"pair {pair}: the {'answer' if shorter is answer else 'distractor'} (tokens {shorter}) is the "
            f"start of the {'distractor' if shorter is answer else 'answer'} (tokens {longer}): the two "
            "continuations never branch, so no next-token comparison tells them apart. Use a distractor "
            "that differs from the answer in some token"
        )
    return len(answer) - 1
