"""Source outputs: recording them in a forward pass, the source-major buffer they live in, and the values
an ablated edge carries instead (the corrupted run's outputs, a mean over reference prompts, or zero).

Source outputs live in a source-major buffer `[n_sources, B, P, d_model]` (exposed to hooks as the view
`[B, P, n_sources, d_model]`), so that the rows of any prefix of sources form one contiguous matrix
`[n, B * P * d_model]`: the edge scorer (`attribution/recorder.py`) multiplies those rows with gradients,
and circuit evaluation (`intervention.py`) sums them per destination. For a model spread over devices,
`SourceOutputs` keeps such a buffer in shards, each beside the layers whose outputs it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from circuits.data import PromptPairs
from circuits.errors import InputError
from circuits.graph import Graph
from circuits.models.hooked import HookedModel, HookFn, uses_model
from circuits.models.wiring import wiring

Ablation = Literal["patching", "mean", "zero"]
ABLATIONS: tuple[Ablation, ...] = ("patching", "mean", "zero")


def source_buffer(graph: Graph, rows: int, n_pos: int, device: torch.device, n: int | None = None) -> Tensor:
    """Uninitialised outputs of `n` sources (default all), a [rows, P, n, d] view of source-major storage."""
    n = graph.n_sources if n is None else n
    return torch.empty(n, rows, n_pos, graph.spec.d_model, device=device).permute(1, 2, 0, 3)


Placement = list[tuple[slice, torch.device]]  # contiguous sources and the device they are kept on


def source_placement(model: HookedModel, graph: Graph) -> Placement:
    """Where each source's outputs are kept: beside the layer that writes them (the input: with the
    embeddings), consecutive sources on one device grouped; one entry for a model on one device."""
    devices = []
    for site in wiring(model, graph.spec).sources:
        device = model.device if site.kind == "input" else model.layer_device(site.layer)
        devices += [device] * (site.sources.stop - site.sources.start)
    placement: Placement = []
    for index, device in enumerate(devices):
        if placement and placement[-1][1] == device:
            placement[-1] = (slice(placement[-1][0].start, index + 1), device)
        else:
            placement.append((slice(index, index + 1), device))
    return placement


@dataclass
class SourceOutputs:
    """Source outputs [B, P, n_sources, d_model] in shards of contiguous sources, each a [B, P, n, d] view
    of source-major storage (`source_buffer`) on its own device. A model on one device has one shard."""

    shards: list[tuple[slice, Tensor]]

    @classmethod
    def empty(cls, graph: Graph, rows: int, n_pos: int, placement: Placement) -> SourceOutputs:
        """Uninitialised outputs for `rows` rows of `n_pos` positions, sharded as `placement` says."""
        return cls(
            [
                (sources, source_buffer(graph, rows, n_pos, device, sources.stop - sources.start))
                for sources, device in placement
            ]
        )

    @classmethod
    def of(cls, outputs: Tensor | SourceOutputs) -> SourceOutputs:
        """`outputs` as it is, or a tensor [B, P, n_sources, d] as outputs kept on its one device."""
        return outputs if isinstance(outputs, SourceOutputs) else cls([(slice(0, outputs.shape[2]), outputs)])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, p, _, d = self.shards[0][1].shape
        return b, p, self.shards[-1][0].stop, d

    @property
    def placement(self) -> Placement:
        return [(sources, t.device) for sources, t in self.shards]

    def select(self, index: int | slice) -> Tensor:
        """Source `index` [B, P, d] or sources `index` [B, P, n, d] (within one layer's shard): a view."""
        start = index if isinstance(index, int) else index.start
        stop = start + 1 if isinstance(index, int) else index.stop
        for sources, t in self.shards:
            if sources.start <= start and stop <= sources.stop:
                if isinstance(index, int):
                    return t[:, :, index - sources.start]
                return t[:, :, start - sources.start : stop - sources.start]
        raise AssertionError(f"sources {index} are kept on more than one device")

    def matrices(self, rows: slice) -> Iterator[tuple[slice, Tensor]]:
        """For each shard's part of sources `rows`: those sources and their [n, B * P * d] rows."""
        for sources, t in self.shards:
            start, stop = max(rows.start, sources.start), min(rows.stop, sources.stop)
            if start < stop:
                yield slice(start, stop), source_major(t[:, :, start - sources.start : stop - sources.start])

    def map(self, view: Callable[[Tensor], Tensor]) -> SourceOutputs:
        """`view` applied to every shard [B, P, n, d] (e.g. `lambda t: t[:, :P]`; rows or positions only)."""
        return SourceOutputs([(sources, view(t)) for sources, t in self.shards])

    def gather(self, ids: Tensor, device: torch.device) -> Tensor:
        """Sources `ids` (any order) as one tensor [B, P, len(ids), d] on `device`."""
        b, p, _, d = self.shape
        out = torch.empty(b, p, ids.numel(), d, dtype=self.shards[0][1].dtype, device=device)
        for t, inside, local in self._split(ids):
            out[:, :, inside] = t[:, :, local].to(device)
        return out

    def per_row(self, examples: Tensor, ids: Tensor, device: torch.device) -> Tensor:
        """[k, P, d] on `device`: row i is source `ids[i]` of example `examples[i]` (both [k])."""
        _, p, _, d = self.shape
        out = torch.empty(ids.numel(), p, d, dtype=self.shards[0][1].dtype, device=device)
        examples = examples.cpu()
        for t, inside, local in self._split(ids):
            out[inside] = t[examples[inside], :, local].to(device)
        return out

    def _split(self, ids: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """For each shard holding some of `ids`: the shard, where in `ids` they stand, their index in it."""
        ids = ids.cpu()
        for sources, t in self.shards:
            inside = ((ids >= sources.start) & (ids < sources.stop)).nonzero()[:, 0]
            if inside.numel():
                yield t, inside, ids[inside] - sources.start

    def fill(self, values: Tensor) -> SourceOutputs:
        """Copy in `values` [1 or B, P', n_sources, d] (P' >= P positions; broadcast over rows)."""
        for sources, t in self.shards:
            t.copy_(values[:, : t.shape[1], sources].to(t.device).expand_as(t))
        return self

    def align_(self, pairs: PromptPairs, clean: SourceOutputs) -> SourceOutputs:
        """Corrupted-run outputs moved, in place, to the clean positions they correspond to, with `clean`'s
        outputs where a position has no counterpart (`PromptPairs.align`; rows: repeats of `pairs`)."""
        if pairs.aligned:
            for (_, t), (_, c) in zip(self.shards, clean.shards, strict=True):
                t.copy_(pairs.align(t, c))
        return self

    def sub_(self, other: SourceOutputs) -> SourceOutputs:
        for (_, t), (_, o) in zip(self.shards, other.shards, strict=True):
            t.sub_(o)
        return self

    def difference(self, minuend: SourceOutputs, subtrahend: SourceOutputs) -> SourceOutputs:
        """Write minuend - subtrahend into these outputs (all three sharded alike)."""
        for (_, t), (_, a), (_, b) in zip(self.shards, minuend.shards, subtrahend.shards, strict=True):
            torch.sub(a, b, out=t)
        return self


def source_major(acts: Tensor) -> Tensor:
    """[B, P, n_sources, d] -> [n_sources, B * P * d] (free for `source_buffer` layouts)."""
    return acts.permute(2, 0, 1, 3).reshape(acts.shape[2], -1)


def source_hooks(
    model: HookedModel, graph: Graph, out: SourceOutputs, subtract: bool = False
) -> list[tuple[str, HookFn]]:
    """Hooks writing every source's output into `out` (no grad), or, with `subtract`, subtracting it from
    what `out` holds (turning ablated outputs into ablated - current).

    A layer's head results z_h W_O[h] (`HookedModel.head_results`) are computed straight into `out` when
    its shard covers all positions: one batched matmul per layer, the subtraction fused into it.
    """

    def write(index: int | slice, transform: Callable[[Tensor], Tensor] | None = None) -> HookFn:
        target = out.select(index)  # [B, P, d] or [B, P, n, d]

        def fn(x: Tensor) -> None:
            if model.recomputing:  # written in the first run of the block
                return
            with torch.no_grad():
                value = (transform(x) if transform else x).to(target)  # the shard's device too
                if subtract:
                    target[:, : x.shape[1]] -= value
                else:
                    target[:, : x.shape[1]] = value

        return fn

    def write_heads(layer: int, heads: slice) -> HookFn:
        w_o = model.W_O(layer)
        generic = write(heads, lambda z: model.head_results(layer, z))
        target = out.select(heads)  # [B, P, n_heads, d]

        def fn(z: Tensor) -> None:
            if model.recomputing:
                return
            storage = target.permute(2, 0, 1, 3)  # [n_heads, B, P, d] for source-major storage
            if (
                not storage.is_contiguous()
                or z.shape[:2] != target.shape[:2]
                or z.dtype != target.dtype
                or z.device != target.device
            ):
                generic(z)
                return
            with torch.no_grad():
                n, rows = w_o.shape[0], z.shape[0] * z.shape[1]
                z_heads = z.reshape(rows, n, -1).transpose(0, 1)  # [n_heads, B * P, d_head]
                view = storage.view(n, rows, -1)
                if subtract:
                    view.baddbmm_(z_heads, w_o.to(z.dtype), alpha=-1.0)
                else:
                    torch.bmm(z_heads, w_o.to(z.dtype), out=view)

        return fn

    hooks = []
    for site in wiring(model, graph.spec).sources:
        match site.kind:
            case "heads":
                hooks.append((site.hook, write_heads(site.layer, site.sources)))
            case "input" | "attention" | "mixer" | "mlp":  # one source: the hook carries its output
                hooks.append((site.hook, write(site.sources.start)))
    return hooks


@dataclass(frozen=True)
class AblationValues:
    """What an ablated source carries under mean or zero ablation, per aligned position.

    Positions correspond as in `PromptPairs.alignment`: the start tokens by their index, every other
    position by its distance from the prompt's last real token. So prompts of any lengths get, at each
    position, the mean over the reference prompts that have a position there, never a mean pooled over
    positions.
    """

    start: Tensor  # [S, n_sources, d]: at the S start tokens
    from_end: Tensor  # [K, n_sources, d]: row k at k positions before the last real token
    reach: int  # tokens past the start ones that the longest reference prompt has (= K); -1 for zeros
    # [n_spans, n_sources, d]: means per span instead (prompts of one span schema, `PromptPairs.span_index`)
    per_span: Tensor | None = None

    def for_pairs(self, pairs: PromptPairs) -> Tensor:
        """[N, P, n_sources, d] the values at every position of `pairs`' clean prompts (zeros on padding);
        `InputError` when a prompt reaches further back than every reference prompt."""
        if self.per_span is not None:
            if pairs.span_index is None:
                raise InputError("these ablation values are means per span: the pairs must carry their spans")
            index = pairs.span_index.to(self.per_span.device)
            return self.per_span[index.clamp(min=0)] * (index >= 0)[:, :, None, None]
        s = self.start.shape[0]
        device = self.from_end.device
        lengths = pairs.lengths.to(device)
        if self.reach >= 0 and int(lengths.max()) - s > self.reach:
            i = int(lengths.argmax())
            raise InputError(
                f"mean ablation per aligned position: pair {i} has {int(lengths[i])} tokens, but no "
                f"reference prompt has more than {self.reach + s}, so its first positions have no mean. "
                "Pass reference prompts at least as long as the prompts scored"
            )
        p = torch.arange(pairs.n_positions, device=device)[None, :]
        back = (lengths[:, None] - 1 - p).clamp(min=0, max=self.from_end.shape[0] - 1)
        index = torch.where(p < s, p.clamp(max=max(s - 1, 0)), s + back)
        values = torch.cat([self.start, self.from_end])[index]  # [N, P, n_sources, d]
        return values * (p < lengths[:, None])[:, :, None, None]


@uses_model
def source_means(
    model: HookedModel,
    graph: Graph,
    reference: PromptPairs,
    ablation: str,
    batch_size: int = 8,
    n_spans: int = 0,
) -> AblationValues:
    """Ablation values: zeros, or each source's mean output over `reference`'s clean prompts at each
    aligned position (`AblationValues`); with `n_spans`, over the positions of each span instead (the
    reference prompts carry their spans: mean ablation over prompts of one schema)."""
    n, d = graph.n_sources, graph.spec.d_model
    s = reference.start_tokens
    if ablation == "zero":
        zeros = torch.zeros(1, n, d, device=model.device)
        return AblationValues(zeros.expand(s, -1, -1), zeros, -1)
    if n_spans:
        return _span_means(model, graph, reference, n_spans, batch_size)
    reach = int(reference.lengths.max()) - s
    totals = torch.zeros(s + reach, n, d, device=model.device)
    counts = torch.zeros(s + reach, device=model.device)
    for batch in reference.batches(batch_size):
        acts = torch.zeros(len(batch), batch.n_positions, n, d, device=model.device)
        with torch.no_grad(), model.hooks(source_hooks(model, graph, SourceOutputs.of(acts))):
            model(batch.clean.to(model.device), batch.attention_mask.to(model.device))
        p = torch.arange(batch.n_positions, device=model.device)[None, :]
        lengths = batch.lengths.to(model.device)[:, None]
        slot = torch.where(p < s, p, s + lengths - 1 - p)  # start tokens, then distance from the end
        real = (p < lengths).expand_as(slot)
        totals.index_add_(0, slot[real], acts[real])
        counts.index_add_(0, slot[real], torch.ones_like(slot[real], dtype=counts.dtype))
    means = totals / counts.clamp(min=1)[:, None, None]
    return AblationValues(means[:s], means[s:], reach)


def _span_means(
    model: HookedModel, graph: Graph, reference: PromptPairs, n_spans: int, batch_size: int
) -> AblationValues:
    """Each source's mean output over the positions of each span of `reference`'s clean prompts."""
    if reference.span_index is None:
        raise InputError(
            "mean ablation per span needs reference prompts that carry their spans (Spans.attach)"
        )
    n, d = graph.n_sources, graph.spec.d_model
    totals = torch.zeros(n_spans, n, d, device=model.device)
    counts = torch.zeros(n_spans, device=model.device)
    for batch in reference.batches(batch_size):
        acts = torch.zeros(len(batch), batch.n_positions, n, d, device=model.device)
        with torch.no_grad(), model.hooks(source_hooks(model, graph, SourceOutputs.of(acts))):
            model(batch.clean.to(model.device), batch.attention_mask.to(model.device))
        assert batch.span_index is not None
        index = batch.span_index.to(model.device)
        real = index >= 0
        totals.index_add_(0, index[real], acts[real])
        counts.index_add_(0, index[real], torch.ones_like(index[real], dtype=counts.dtype))
    empty = torch.zeros(0, n, d, device=model.device)
    return AblationValues(empty, empty, -1, totals / counts.clamp(min=1)[:, None, None])
