"""Spans: named stretches of positions shared by prompts of one schema, for position-aware circuits.

A schema is an ordered list of span names; each prompt's positions fall into them in order (a span may be
empty in a prompt, padding is in none), and the last real position is always a span of its own, `end`,
where the metric reads the logits. Position-aware EAP (Haklay et al., ACL 2025, arXiv 2502.04577) scores
edges per span, so that "head 3.1 at the subject's position" and "head 3.1 at the last position" are
different nodes; prompts of different lengths line up span by span.

Where spans come from, without asking any language model:
- `Spans.from_segments`: a generator that knows its templates names the text pieces of each prompt (IOI:
  `tasks.ioi` gives prefix, A, and, B, context, S2, action); tokens go to the piece holding their last
  character (the tokenizer's offsets), so leading spaces may sit on either side of a boundary;
- `Spans.from_differences`: from the prompt pairs alone, the runs of positions where clean and corrupted
  tokens differ (`d0`, `d1`, ...) and the runs between them (`s0`, `s1`, ...), with the start tokens
  (`bos`) and the last position (`end`) apart; every pair must show the same pattern of runs. Marked
  tokens split the unchanged runs further (`answer_marks`: the tokens equal to the answer or distractor;
  or the most salient tokens, `token_saliency`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from circuits.data import PromptPairs
from circuits.errors import FileFormatError, InputError
from circuits.metrics import get_metric
from circuits.models.hooked import HookedModel

END = "end"  # the last real position's span
START = "bos"  # the start tokens' span, where the model prepends them


def check_schema(names: Sequence[str]) -> None:
    """`InputError` unless `names` are distinct span names ending with `end`."""
    if (
        not names
        or names[-1] != END
        or len(set(names)) != len(names)
        or not all(isinstance(n, str) for n in names)
    ):
        raise InputError(f"span names must be distinct strings ending with {END!r}, got {list(names)}")


@dataclass(frozen=True)
class Spans:
    """Which span each clean position of N prompts falls in.

    Attributes:
        names: the schema, S span names in order, the last one `end`.
        index: [N, P] long, the span of each position (in 0..S-1, non-decreasing along a prompt), -1 on
            padding; each prompt's last real position, and it alone, is in `end`.
    """

    names: tuple[str, ...]
    index: Tensor

    def __post_init__(self) -> None:
        names, index = self.names, self.index
        check_schema(names)
        if index.dim() != 2 or index.dtype != torch.long:
            raise InputError(
                f"Spans.index must be a long tensor [N, P], got {index.dtype} {tuple(index.shape)}"
            )
        if int(index.min()) < -1 or int(index.max()) >= len(names):
            raise InputError(f"Spans.index must lie in -1..{len(names) - 1} (the spans), or -1 on padding")
        real = index >= 0
        lengths = real.sum(1)
        if bool((real != (torch.arange(index.shape[1])[None] < lengths[:, None])).any()):
            raise InputError("Spans.index: padding (-1) must come after every real position of a prompt")
        steps = index[:, 1:] - index[:, :-1]
        if bool(((steps < 0) & real[:, 1:]).any()):
            raise InputError("Spans.index: a prompt's spans must come in the schema's order")
        last = index.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
        ends = (index == len(names) - 1).sum(1)
        if bool((lengths == 0).any() or (last != len(names) - 1).any() or (ends != 1).any()):
            raise InputError(f"Spans.index: each prompt's last position, and it alone, must be in {END!r}")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def lengths(self) -> Tensor:
        """[N, S] positions of each prompt in each span."""
        one_hot = torch.nn.functional.one_hot(self.index.clamp(min=0), len(self.names))
        return (one_hot * (self.index >= 0)[..., None]).sum(1)

    def positions(self, name: str) -> Tensor:
        """bool [N, P]: the positions in span `name`."""
        if name not in self.names:
            raise InputError(f"no span {name!r}; the spans are {list(self.names)}")
        return self.index == self.names.index(name)

    def tokens(self, model: HookedModel, pairs: PromptPairs, row: int = 0) -> list[list[str]]:
        """Prompt `row`'s clean tokens in each span, as text (e.g. to label a drawing's columns)."""
        ids, index = pairs.clean[row].tolist(), self.index[row].tolist()
        words: list[list[str]] = [[] for _ in self.names]
        for token, span in zip(ids, index):
            if span >= 0:
                words[span].append(str(model.tokenizer.decode([token])))
        return words

    def check_fits(self, pairs: PromptPairs) -> None:
        """`InputError` unless these spans cover exactly the clean prompts of `pairs`."""
        real = (self.index >= 0).sum(1)
        if self.index.shape[0] != len(pairs) or not torch.equal(real.cpu(), pairs.lengths.cpu()):
            raise InputError(
                f"spans of {self.index.shape[0]} prompts ({real.tolist()[:4]} positions...) do not cover "
                f"these {len(pairs)} pairs ({pairs.lengths.tolist()[:4]} positions...)"
            )

    def attach(self, pairs: PromptPairs) -> PromptPairs:
        """`pairs` carrying these spans (`PromptPairs.span_index`), checked to cover them."""
        self.check_fits(pairs)
        return replace(pairs, span_index=self.index.to(pairs.clean.device))

    @classmethod
    def from_json(cls, path: Path) -> Spans:
        """A schema file: {"spans": [span names, the last `end`], "index": [[each position's span, -1 on
        padding] per prompt]} (a prompt's row may stop at its last position)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FileFormatError(f"{path}: not a readable JSON file ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("spans"), list):
            raise FileFormatError(f'{path}: a schema file is {{"spans": [...], "index": [[...], ...]}}')
        rows = data.get("index")
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
            raise FileFormatError(f"{path}: `index` must be a list of per-prompt lists of span indices")
        width = max(len(r) for r in rows)
        if not all(isinstance(i, int) and not isinstance(i, bool) for r in rows for i in r):
            raise FileFormatError(f"{path}: `index` holds span indices (integers)")
        index = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)
        return cls(tuple(data["spans"]), index)

    @classmethod
    def from_segments(
        cls, model: HookedModel, pairs: PromptPairs, segments: Sequence[Sequence[tuple[str, str]]]
    ) -> Spans:
        """Spans of prompts given as named text pieces: segments[i] = [(span name, text), ...] whose texts
        concatenate to clean prompt i. The schema is the names in their order of appearance (a name missing
        from a prompt is an empty span there), then `end`, the last token taken out of its piece; with a
        start token, `bos` first."""
        if len(segments) != len(pairs):
            raise InputError(f"{len(segments)} segmented prompts for {len(pairs)} pairs")
        if not getattr(model.tokenizer, "is_fast", False):
            raise InputError(
                f"{type(model.tokenizer).__name__} gives no character offsets (a slow tokenizer): load the "
                "model with its fast tokenizer, or read the spans off the pairs (Spans.from_differences)"
            )
        names: list[str] = [START] if model.prepend_bos else []
        for pieces in segments:
            for name, _ in pieces:
                if name in (START, END):
                    raise InputError(f"{name!r} is the name of a span made here; name the pieces otherwise")
                if name not in names:
                    names.append(name)
        names.append(END)
        index = torch.full(pairs.clean.shape, -1, dtype=torch.long)
        for row, pieces in enumerate(segments):
            text = "".join(part for _, part in pieces)
            starts, position = [], 0
            for _, part in pieces:
                starts.append(position)
                position += len(part)
            encoded = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = encoded["offset_mapping"]
            first = int(model.prepend_bos)
            if first + len(offsets) != int(pairs.lengths[row]):
                raise InputError(
                    f"prompt {row} ({text!r}) is {len(offsets)} tokens here but "
                    f"{int(pairs.lengths[row]) - first} in the pairs: the segments are not the clean prompt"
                )
            if first:
                index[row, 0] = 0
            for p, (_, end) in enumerate(offsets):  # the piece holding the token's last character
                holder = max(i for i, start in enumerate(starts) if start < max(end, 1))
                index[row, first + p] = names.index(pieces[holder][0])
            index[row, first + len(offsets) - 1] = len(names) - 1
        if bool((index[:, 1:] < index[:, :-1]).logical_and(index[:, 1:] >= 0).any()):
            raise InputError("the prompts' pieces do not come in one order: they share no schema")
        return cls(tuple(names), index)

    @classmethod
    def from_differences(
        cls, pairs: PromptPairs, marks: Tensor | None = None, saliency: Tensor | None = None, salient: int = 0
    ) -> Spans:
        """The schema read off where each pair's clean and corrupted tokens differ (see module doc); prompts
        of different lengths compare position by position as `PromptPairs.alignment` lines them up.

        The runs of unchanged tokens can be split further, at marked positions, each a span of its own: run
        `s0` with two marks becomes `s0.0`, `s0.m1`, `s0.1`, `s0.m2`, `s0.2`. `marks` (bool [N, P]) are
        given (e.g. `answer_marks`: tokens equal to the pair's answer or distractor, which IOI's names
        are), and every prompt must have as many in each run; with `saliency` [N, P] (e.g.
        `token_saliency`), each run's `salient` most salient positions in each prompt are marked too."""
        n, p = pairs.clean.shape
        where = pairs.alignment.cpu()
        corrupted = pairs.corrupted.cpu().gather(1, where.clamp(min=0))
        differs = (corrupted != pairs.clean.cpu()) | (where < 0)  # no counterpart: differs
        start = pairs.start_tokens
        patterns: list[list[tuple[str, int, int]]] = []
        for row in range(n):
            last = int(pairs.lengths[row]) - 1
            runs: list[tuple[str, int, int]] = [(START, 0, start)] if start else []
            position = start
            while position < last:
                different = bool(differs[row, position])
                stop = position
                while stop < last and bool(differs[row, stop]) == different:
                    stop += 1
                runs.append(("d" if different else "s", position, stop))
                position = stop
            patterns.append(runs)
        kinds = [tuple(kind for kind, _, _ in runs) for runs in patterns]
        if len(set(kinds)) > 1:
            other = next(i for i, k in enumerate(kinds) if k != kinds[0])
            shown = [" ".join(k for k in kinds[i] if k != START) for i in (0, other)]
            raise InputError(
                f"pairs 0 and {other} differ in different places ({shown[0]!r} vs {shown[1]!r}: s = same "
                "tokens, d = different): no one schema fits them; split the pairs by template, or give the "
                "spans (Spans.from_segments)"
            )
        marked = _marks(pairs, patterns, marks, saliency, salient)  # per prompt and run: marked positions
        counts = {"s": 0, "d": 0}
        names: list[str] = []
        for j, kind in enumerate(kinds[0]):
            if kind == START:
                names.append(START)
                continue
            name = f"{kind}{counts[kind]}"
            counts[kind] += 1
            k = len(marked[0][j])
            if k:
                names += [piece for i in range(k) for piece in (f"{name}.{i}", f"{name}.m{i + 1}")]
            names.append(f"{name}.{k}" if k else name)
        names.append(END)
        index = torch.full((n, p), -1, dtype=torch.long)
        for row, runs in enumerate(patterns):
            span = 0
            for j, (_, begin, stop) in enumerate(runs):
                position = begin
                for i, top in enumerate(marked[row][j]):  # pieces 2i (before the mark) and 2i + 1 (it)
                    index[row, position:top] = span + 2 * i
                    index[row, top] = span + 2 * i + 1
                    position = top + 1
                index[row, position:stop] = span + 2 * len(marked[row][j])
                span += 2 * len(marked[row][j]) + 1
            index[row, int(pairs.lengths[row]) - 1] = len(names) - 1
        return cls(tuple(names), index)


def _marks(
    pairs: PromptPairs,
    patterns: list[list[tuple[str, int, int]]],
    marks: Tensor | None,
    saliency: Tensor | None,
    salient: int,
) -> list[list[list[int]]]:
    """For each prompt and run, its marked positions in order (runs of unchanged tokens only); every
    prompt must have as many marks in each run."""
    shape = tuple(pairs.clean.shape)
    for name, value in (("marks", marks), ("saliency", saliency)):
        if value is not None and tuple(value.shape) != shape:
            raise InputError(f"{name} must be [N, P] like the pairs {shape}, got {tuple(value.shape)}")
    if salient and saliency is None:
        raise InputError(f"salient={salient} needs the tokens' saliency [N, P] (token_saliency)")
    out: list[list[list[int]]] = []
    for row, runs in enumerate(patterns):
        per_run: list[list[int]] = []
        for kind, begin, stop in runs:
            chosen: set[int] = set()
            if kind == "s" and marks is not None:
                chosen |= {begin + int(i) for i in marks[row, begin:stop].nonzero()[:, 0]}
            if kind == "s" and salient and saliency is not None:
                scores = saliency[row, begin:stop].float().cpu()
                chosen |= {begin + int(i) for i in torch.topk(scores, min(salient, stop - begin)).indices}
            per_run.append(sorted(chosen))
        out.append(per_run)
    for row, per_run in enumerate(out):
        counts = [len(m) for m in per_run]
        if counts != [len(m) for m in out[0]]:
            raise InputError(
                f"prompts 0 and {row} have different numbers of marked tokens in their runs "
                f"({[len(m) for m in out[0]]} vs {counts}): no one schema fits them"
            )
    return out


def answer_marks(pairs: PromptPairs) -> Tensor:
    """bool [N, P]: the clean positions (not start tokens, not the last) holding the pair's answer or
    distractor token, e.g. IOI's two names in the prompt: a mark for `Spans.from_differences`."""
    p = torch.arange(pairs.n_positions)[None, :]
    tokens = pairs.clean.cpu()
    match = (tokens == pairs.answer.cpu()[:, None]) | (tokens == pairs.distractor.cpu()[:, None])
    inside = (p >= pairs.start_tokens) & (p < pairs.lengths.cpu()[:, None] - 1)
    return match & inside


def token_saliency(model: HookedModel, pairs: PromptPairs, batch_size: int = 8) -> Tensor:
    """[N, P] |e_p . dM/de_p| at the clean prompts: how much each token's input (embedding) moves the
    pairs' metric to first order (gradient x input; zero on padding), for `Spans.from_differences`."""
    metric = get_metric(pairs.metric_for(None))
    out = torch.zeros(pairs.clean.shape)
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        kept: dict[str, Tensor] = {}

        def leaf(x: Tensor, kept: dict[str, Tensor] = kept) -> Tensor:
            kept["e"] = x.detach().requires_grad_(True)
            return kept["e"]

        with torch.enable_grad(), model.hooks([(model.input_hook, leaf)]):
            logits = model(batch.clean.to(model.device), batch.attention_mask.to(model.device))
            metric(logits, batch, logits.detach()).sum().backward()
        e = kept["e"]
        assert e.grad is not None
        values = (e * e.grad).sum(-1).abs().detach().cpu() * batch.attention_mask.cpu()
        out[start : start + len(batch), : values.shape[1]] = values
    return out
