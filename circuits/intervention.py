"""Forward passes with edges ablated: the mechanism behind exact patching and circuit evaluation.

For every destination v, its input becomes
    x_v' = x_v + sum over ablated edges u->v of (a_u(ablated) - a_u(current run)),
where a_u(current run) is u's output in this very forward pass (so ablations upstream propagate) and
a_u(ablated) is a fixed tensor: the corrupted run's output (patching), a mean over a reference set (mean),
or zero. Sources are computed before the destinations that read them, so one forward pass does it.

The ablation set is a mask `[rows, n_sources, n_destinations]` (one per batch row, so that many single-edge
patches run side by side) or `[n_sources, n_destinations]` shared by all rows. A head's q/k/v input is
rebuilt per head: q_h = W_Q[h] norm(resid + D_h) + b_h, written into the projection's output.

Two ways to sum the differences, picked by the mask's form:
- per-row masks (exact patching) touch few sources: only those are recorded and summed;
- a shared mask (circuit evaluation) may touch every source: all differences a_u(ablated) - a_u(current)
  are kept source-major with their running total T, and each destination block sums over whichever side
  is smaller: the ablated sources directly, or T minus the kept (circuit) sources. Small and large
  circuits both cost a few gathers per block instead of a pass over every source.

Ablated outputs may come as one tensor or as `SourceOutputs` kept beside the layers that write them (a
model over several devices, `sources.source_placement`); the differences are kept beside those layers too.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import Tensor

from circuits.errors import InputError, UnsupportedModelError
from circuits.graph import Graph
from circuits.models.checks import pattern_problem, probed
from circuits.models.hooked import HookedModel, HookFn
from circuits.models.wiring import DestinationSite, residual_factors, wiring
from circuits.sources import Placement, SourceOutputs, source_major, source_placement


def forward_with_ablation(
    model: HookedModel,
    graph: Graph,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    ablated: Tensor | SourceOutputs,
    ablation_mask: Tensor,
    span_index: Tensor | None = None,
) -> Tensor:
    """Logits [rows, P, d_vocab] with the edges in `ablation_mask` carrying `ablated` source outputs.

    Args:
        input_ids: [rows, P].
        ablated: [r, P, n_sources, d_model] source outputs to patch in, with r dividing rows (row i of the
            batch uses ablated row i mod r; e.g. r = b examples repeated for several masks).
        ablation_mask: bool [rows, n_sources, n_destinations] or [n_sources, n_destinations]; with
            `span_index`, per span: [rows, S, n_sources, n_destinations] or [S, n_sources, n_destinations]
            (edge u -> v ablated at span s: at the positions of s, where u writes and v reads).
        span_index: [r, P] long, each position's span (-1 on padding), r dividing rows.
    """
    rows, n_pos = input_ids.shape
    patch = _rows_dividing(ablated, rows, n_pos)
    mask = ablation_mask.to(input_ids.device) & graph.valid.to(input_ids.device)
    if not bool(mask.any()):
        with torch.no_grad():
            return model(input_ids, attention_mask)
    sums: _Corrections
    if span_index is not None:
        if rows % span_index.shape[0] or span_index.shape[1] < n_pos:
            raise InputError(f"span_index {tuple(span_index.shape)} does not fit a batch [{rows}, {n_pos}]")
        spans = span_index[:, :n_pos].to(input_ids.device).repeat(rows // span_index.shape[0], 1)
        if mask.dim() == 3:  # one mask per span, shared by the rows
            sums = _SpanShared(graph, mask, _tiled(patch, rows), rows, source_placement(model, graph), spans)
        else:
            sums = _PerRow(graph, mask, patch, rows, spans)
    elif mask.dim() == 3:
        sums = _PerRow(graph, mask, patch, rows)
    else:
        sums = _Shared(graph, mask, patch, rows, source_placement(model, graph))
    with torch.no_grad(), model.hooks(_ablation_hooks(model, graph, sums)):
        return model(input_ids, attention_mask)


def forward_with_weighted_ablation(
    model: HookedModel,
    graph: Graph,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    ablated: Tensor | SourceOutputs,
    weights: Tensor,
) -> Tensor:
    """Logits [rows, P, d_vocab] with each edge u->v ablated by the fraction `weights[u, v]`:
    x_v' = x_v + sum_u w_uv (a_u(ablated) - a_u(current run)), differentiable in `weights` (and with
    gradients kept: call it where autograd should run). With 0/1 weights it is `forward_with_ablation`.

    Args:
        ablated: [r, P, n_sources, d_model] with r dividing rows.
        weights: float [n_sources, n_destinations]; entries outside `graph.valid` are ignored.
    """
    patch = _rows_dividing(ablated, *input_ids.shape)
    if weights.shape != graph.valid.shape or not weights.is_floating_point():
        raise InputError(f"weights must be float {tuple(graph.valid.shape)}, got {tuple(weights.shape)}")
    valid = graph.valid.to(weights.device)
    sums = _Weighted(graph, weights * valid, patch)
    with model.hooks(_ablation_hooks(model, graph, sums)):
        return model(input_ids, attention_mask)


def ablation_gradient(
    model: HookedModel,
    graph: Graph,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    ablated: Tensor | SourceOutputs,
    ablation_mask: Tensor,
    measure: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """The ablated run's measurements and their gradient with respect to each edge's ablation weight, at
    the run with `ablation_mask` ablated: d sum(measure) / d w_uv = sum over rows and positions of
    g_v . (a_u(ablated) - a_u(current run)), g_v the gradient at v's corrected input (EAP's formula, taken
    in the ablated run instead of the clean one; with nothing ablated it is EAP's score).

    Args:
        ablated: [r, P, n_sources, d_model] with r = 1 or rows.
        ablation_mask: bool [n_sources, n_destinations], shared by all rows.
        measure: logits [rows, P, d_vocab] -> [rows].
    Returns:
        measurements [rows] (detached) and float64 [n_sources, n_destinations] (0 off `graph.valid`).
    """
    rows, n_pos = input_ids.shape
    patch = SourceOutputs.of(ablated).map(lambda t: t[:, :n_pos])
    if patch.shape[0] not in (1, rows):
        raise InputError(f"ablated has {patch.shape[0]} rows; need 1 or the batch's {rows}")
    mask = ablation_mask.to(input_ids.device) & graph.valid.to(input_ids.device)
    sums = _Weighted(graph, mask.float(), patch)
    inputs: list[tuple[slice, Tensor]] = []
    hooks = [(model.input_hook, _requiring_grad), *_ablation_hooks(model, graph, sums, inputs)]
    with torch.enable_grad(), model.hooks(hooks):
        values = measure(model(input_ids, attention_mask))
        grads = torch.autograd.grad(values.sum(), [x for _, x in inputs], allow_unused=True)
    stacked = sums.stacked()  # (first source, [k, rows * P * d]) per device, times c_u / P_j (`_Corrections`)
    prefix = graph.valid_prefixes()
    out = torch.zeros(graph.valid.shape, dtype=torch.float64)
    factors = residual_factors(model, graph.spec)
    if factors is not None:  # a destination's input moves by P_m times its weighted sum
        per_destination = factors[1]
    for (cols, _), g in zip(inputs, grads):
        if g is None:
            continue
        n = prefix[cols.start]
        per_dst = g.detach().permute(2, 0, 1, 3).flatten(1)  # [n_block, rows * P * d]
        for first, diff in stacked:
            if first < n:
                block = diff[: n - first]
                out[first : first + block.shape[0], cols] = (block @ per_dst.T.to(diff)).double().cpu()
    if factors is not None:
        out *= per_destination[None]
    return values.detach(), out * graph.valid


def _rows_dividing(ablated: Tensor | SourceOutputs, rows: int, n_pos: int) -> SourceOutputs:
    """`ablated` at the first `n_pos` positions, checked to have a number of rows dividing `rows`."""
    patch = SourceOutputs.of(ablated).map(lambda t: t[:, :n_pos])
    if rows % patch.shape[0]:
        raise InputError(f"ablated has {patch.shape[0]} rows, which does not divide the batch's {rows}")
    return patch


def _tiled(patch: SourceOutputs, rows: int) -> SourceOutputs:
    """`patch` with 1 row, or tiled to `rows` rows (row i is row i mod r)."""
    r = patch.shape[0]
    return patch if r in (1, rows) else patch.map(lambda t: t.repeat(rows // r, 1, 1, 1))


def _requiring_grad(x: Tensor) -> Tensor:
    """The embeddings as a leaf that requires grad, so that autograd records everything downstream (the
    model's weights may be frozen)."""
    return x.detach().requires_grad_(True)


def _rebuilt_head_inputs(
    model: HookedModel,
    site: DestinationSite,
    corrected: Callable[[slice, Tensor], Tensor | None],
    resid: dict[int, Tensor],
) -> list[tuple[str, HookFn]]:
    """Hooks writing a q (k, v) block's inputs as `qkv_from_residual` computes them from the corrected
    residual, [rows, P, n, d_model] (`resid[layer]` plus the block's correction). Where a projection of
    their own computes the heads' output gates (`site.gate_hook`), q is written at two hooks from one
    corrected input per pass: whichever fires first computes both and leaves the other's part for it."""
    cols, layer, letter = site.destinations, site.layer, site.letter
    assert letter is not None
    n = cols.stop - cols.start

    def values() -> Tensor | None:
        heads = corrected(cols, resid[layer].unsqueeze(2).expand(-1, -1, n, -1))
        return None if heads is None else model.qkv_from_residual(layer, letter, heads)

    if site.gate_hook is None:

        def hook(x: Tensor) -> Tensor | None:
            v = values()
            return None if v is None else v.reshape(x.shape)

        return [(site.hook, hook)]
    left: dict[str, Tensor | None] = {}

    def part(which: str) -> HookFn:
        def hook(x: Tensor) -> Tensor | None:
            if which not in left:
                v = values()
                left["query"], left["gate"] = (None, None) if v is None else model.split_gate(layer, v)
            value = left.pop(which)
            return None if value is None else value.reshape(x.shape)

        return hook

    return [(site.hook, part("query")), (site.gate_hook, part("gate"))]


def _ablation_hooks(
    model: HookedModel, graph: Graph, sums: _Corrections, inputs: list[tuple[slice, Tensor]] | None = None
) -> list[tuple[str, HookFn]]:
    """Hooks that record the sources' outputs into `sums` and add its corrections to every destination.
    With `inputs`, every destination block's corrected input [rows, P, n, d_model] is appended to it with
    its destination slice (blocks with nothing ablated included), for gradients with respect to them."""
    resid: dict[int, Tensor] = {}
    factors = residual_factors(model, graph.spec)
    if factors is not None:
        sums.source_factor = factors[0]

    def corrected(cols: slice, base: Tensor) -> Tensor | None:
        """base [rows, P, n, d] + the block's correction, or None when nothing is added or watched."""
        d = sums.correction(cols)
        if d is None and inputs is None:
            return None
        if d is not None and factors is not None:
            d = d * factors[1][cols].to(d).view(1, 1, -1, 1)
        x = base if d is None else base + d.to(base)
        if inputs is not None:
            inputs.append((cols, x))
        return x

    def record(index: slice, layer: int | None = None) -> HookFn | None:
        ids = torch.arange(graph.n_sources)[index].reshape(-1)
        keep = sums.wanted(ids)
        if keep.numel() == 0:
            return None

        def hook(x: Tensor) -> None:
            value = x.unsqueeze(2) if layer is None else model.head_results(layer, x, keep)
            sums.record(ids[keep], value)

        return hook

    def add_to_input(dst: int) -> HookFn:
        def hook(x: Tensor) -> Tensor | None:
            y = corrected(slice(dst, dst + 1), x.unsqueeze(2))
            return None if y is None else y[:, :, 0]

        return hook

    def renorm_input(site: DestinationSite) -> HookFn:
        """An MLP sharing the attention norm (or a mixer beside attention) reads norm(resid + D): rebuilt
        from the saved residual."""
        cols, layer = site.destinations, site.layer

        def hook(_x: Tensor) -> Tensor | None:
            y = corrected(cols, resid[layer].unsqueeze(2))
            return None if y is None else model.attn_norm(layer)(y[:, :, 0])

        return hook

    def save_resid(layer: int) -> HookFn:
        def hook(x: Tensor) -> None:
            resid[layer] = x

        return hook

    sites = wiring(model, graph.spec)
    recorders = [
        (src.hook, record(src.sources, src.layer if src.per_head else None)) for src in sites.sources
    ]
    hooks: list[tuple[str, HookFn]] = [(name, fn) for name, fn in recorders if fn is not None]
    for dst in sites.destinations:
        match dst.kind:
            case "q" | "k" | "v":
                if dst.kind == "q":  # the residual the layer's q, k and v inputs are rebuilt from
                    hooks.append((dst.residual_hook, save_resid(dst.layer)))  # type: ignore[arg-type]
                hooks += _rebuilt_head_inputs(model, dst, corrected, resid)
            case "mlp" | "mixer" if dst.residual_hook is not None:  # reading the attention norm's output
                hooks.append((dst.hook, renorm_input(dst)))
            case "mixer" | "mlp" | "logits":
                hooks.append((dst.hook, add_to_input(dst.destinations.start)))
    return hooks


def forward_with_node_ablation(
    model: HookedModel,
    graph: Graph,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    ablated: Tensor | SourceOutputs,
    nodes: Tensor,
    positions: Tensor | None = None,
) -> Tensor:
    """Logits [rows, P, d_vocab] with source node `nodes[i]` ablated in row i (every edge out of it).

    Ablating all of a node's outgoing edges changes every downstream input by the same amount, so the node's
    output is replaced where it enters the residual stream: one plain forward with three kinds of hooks.

    Args:
        ablated: [r, P, n_sources, d_model] with r dividing rows (row i uses ablated row i mod r).
        nodes: [rows] source index per row (0 = input, heads, MLPs).
        positions: bool [rows, P], where row i's node is ablated (None: everywhere), e.g. one span.
    """
    rows, n_pos = input_ids.shape
    if nodes.shape != (rows,):
        raise InputError(f"need nodes [rows={rows}], got {tuple(nodes.shape)}")
    if positions is not None and positions.shape[0] != rows:
        raise InputError(f"need positions [rows={rows}, P], got {tuple(positions.shape)}")
    outputs = _rows_dividing(ablated, rows, n_pos)
    row_of = torch.arange(rows)
    patch = outputs.per_row(row_of % outputs.shape[0], nodes, input_ids.device)  # [rows, P, d]: ablated
    where = None if positions is None else positions[:, :n_pos, None].to(input_ids.device)
    head_delta: dict[int, Tensor] = {}

    def replace_rows(selected: Tensor) -> HookFn:
        def hook(x: Tensor) -> Tensor | None:
            if selected.numel() == 0:
                return None
            x = x.clone()
            value = patch[selected].to(x)
            x[selected] = value if where is None else torch.where(where[selected], value, x[selected])
            return x

        return hook

    def head_results(layer: int, selected: Tensor, heads: Tensor) -> HookFn:
        def hook(z: Tensor) -> None:
            if selected.numel():  # row selected[i] ablates head heads[i]
                current = model.head_results(layer, z[selected])[torch.arange(selected.numel()), :, heads]
                delta = patch[selected].to(z) - current
                head_delta[layer] = delta if where is None else delta * where[selected].to(delta)

        return hook

    def add_head_delta(layer: int, selected: Tensor) -> HookFn:
        def hook(x: Tensor) -> Tensor | None:
            if layer not in head_delta:
                return None
            x = x.clone()
            x[selected] = x[selected] + head_delta.pop(layer)
            return x

        return hook

    hooks: list[tuple[str, HookFn]] = []
    for site in wiring(model, graph.spec).sources:
        inside = (nodes >= site.sources.start) & (nodes < site.sources.stop)
        selected = row_of[inside]
        if not selected.numel():
            continue
        match site.kind:
            case "heads":  # each selected row's head output replaced inside the layer's summed output
                heads = nodes[inside] - site.sources.start
                hooks.append((site.hook, head_results(site.layer, selected, heads)))
                hooks.append((site.output_hook, add_head_delta(site.layer, selected)))
            case "input" | "attention" | "mixer" | "mlp":
                hooks.append((site.hook, replace_rows(selected)))
    with torch.no_grad(), model.hooks(hooks):
        return model(input_ids, attention_mask)


class _Corrections:
    """Collects source outputs during the forward pass and returns, per destination block, the summed
    ablation differences [rows, P, n_block, d] (None when nothing into the block is ablated).

    Where the residual stream scales what a source's hook holds on its way to a destination
    (`wiring.residual_factors`: layer scalars, a block's multiplier on its mixer), each difference is
    recorded times its source's factor c_u / P_j (`source_factor`), and `_ablation_hooks` multiplies each
    destination's sum by its P_m: edge u -> v then carries c_u P_m / P_j times u's difference, as the
    residual stream does."""

    source_factor: Tensor | None = None  # [n_sources]

    def wanted(self, ids: Tensor) -> Tensor:
        """Positions in `ids` (source indices) whose outputs must be recorded."""
        raise NotImplementedError

    def record(self, ids: Tensor, value: Tensor) -> None:
        """value: [rows, P, len(ids), d] outputs of sources `ids` in this pass."""
        raise NotImplementedError

    def correction(self, cols: slice) -> Tensor | None:
        raise NotImplementedError


class _PerRow(_Corrections):
    """Per-row masks: only the sources with an ablated edge in some row are recorded.

    With `span_index` [rows, P], the masks are per span, [rows or 1, S, n_sources, n_destinations], and
    position p of row b takes the mask of its span."""

    def __init__(
        self, graph: Graph, mask: Tensor, patch: SourceOutputs, rows: int, span_index: Tensor | None = None
    ) -> None:
        self.sources = _touched(mask)
        self.slot = torch.full((graph.n_sources,), -1, dtype=torch.long)
        self.slot[self.sources.cpu()] = torch.arange(self.sources.numel())
        self.weights = mask[..., self.sources, :].float()  # [rows, k, n_dst] or [rows or 1, S, k, n_dst]
        self.span_index = span_index
        picked = patch.gather(self.sources, mask.device)  # [r, P, k, d]
        self.patch = picked.repeat(rows // picked.shape[0], 1, 1, 1)  # [rows, P, k, d]
        self.current = torch.zeros_like(self.patch)

    def wanted(self, ids: Tensor) -> Tensor:
        return (self.slot[ids] >= 0).nonzero()[:, 0]

    def record(self, ids: Tensor, value: Tensor) -> None:
        self.current[:, :, self.slot[ids].to(self.current.device)] = value.to(self.current)

    def correction(self, cols: slice) -> Tensor | None:
        w = self.weights[..., cols]  # [rows, k, n] or [rows or 1, S, k, n]
        used = _touched(w)
        if used.numel() == 0:
            return None
        diff = self.patch[:, :, used] - self.current[:, :, used]
        if self.source_factor is not None:
            factor = self.source_factor[self.sources[used].cpu()]
            diff = diff * factor.to(diff).view(1, 1, -1, 1)
        w = w[..., used, :]
        if self.span_index is None:
            return torch.einsum("bpsd,bsn->bpnd", diff, w)
        index = self.span_index.to(w.device)  # [rows, P]: each position takes its span's mask
        rows = torch.arange(index.shape[0], device=w.device)[:, None] if w.shape[0] > 1 else 0
        per_position = w[rows, index.clamp(min=0)] * (index >= 0)[..., None, None].to(w)  # [rows, P, k, n]
        return torch.einsum("bpsd,bpsn->bpnd", diff, per_position)


def _touched(mask: Tensor) -> Tensor:
    """The sources (dimension -2 of `mask` [..., n_sources, n]) with some edge set in any row or span."""
    return mask.flatten(0, -3).amax(-1).amax(0).nonzero()[:, 0]


class _Shared(_Corrections):
    """One mask for all rows: every difference kept source-major (beside the layer that wrote it, as
    `placement` says), with their running total."""

    def __init__(
        self, graph: Graph, mask: Tensor, patch: SourceOutputs, rows: int, placement: Placement
    ) -> None:
        self.ablate = mask
        self.kept = graph.valid.to(mask.device) & ~mask
        self.prefix = graph.valid_prefixes()
        self.patch = patch  # [1 or rows, P, n_sources, d]
        n_pos = patch.shape[1]
        self.diff = SourceOutputs.empty(graph, rows, n_pos, placement)
        self.total = torch.zeros(rows, n_pos, graph.spec.d_model, device=placement[0][1])
        # sources recorded so far, in `diff`: in index order, except within a layer whose mixer beside
        # attention runs first (Falcon-H1)
        self.seen = torch.zeros(graph.n_sources, dtype=torch.bool)

    def wanted(self, ids: Tensor) -> Tensor:
        return torch.arange(ids.numel())

    def record(self, ids: Tensor, value: Tensor) -> None:
        span = slice(int(ids[0]), int(ids[-1]) + 1)  # one layer's heads, its MLP, or the input
        target = self.diff.select(span)  # [rows, P, n, d]
        diff = torch.sub(self.patch.select(span).to(target), value.to(target), out=target)
        if self.source_factor is not None:
            diff.mul_(self.source_factor[span].to(diff).view(1, 1, -1, 1))
        self.total = self.total.to(target.device)  # follows the layers over their devices
        self.total += diff.sum(2)
        self.seen[span] = True

    def _weighted(self, sources: Tensor, weights: Tensor, positions: Tensor | None = None) -> Tensor:
        """sum_u weights[u, n] diff_u over `sources` -> [rows, P, n, d], on the running total's device; at
        `positions` (flat indices into rows * P) only: [m, n, d]."""
        rows, n_pos, d = self.total.shape
        m = rows * n_pos if positions is None else positions.numel()
        out: Tensor | None = None  # [n, m * d]
        for kept, shard in self.diff.shards:
            inside = sources[(sources >= kept.start) & (sources < kept.stop)]
            if inside.numel():
                diff = source_major(shard)[(inside - kept.start).to(shard.device)]  # [k, rows * P * d]
                if positions is not None:
                    diff = diff.view(inside.numel(), -1, d)[:, positions.to(diff.device)].flatten(1)
                part = weights[inside].float().T.to(diff) @ diff
                out = part.to(self.total.device) if out is None else out + part.to(out)
        if out is None:
            out = self.total.new_zeros(weights.shape[1], m * d)
        out = out.reshape(-1, m, d).permute(1, 0, 2)  # [m, n, d]
        return out if positions is not None else out.reshape(rows, n_pos, -1, d)

    def correction(self, cols: slice) -> Tensor | None:
        return self._summed(cols, self.ablate, self.kept)

    def _summed(
        self, cols: slice, ablate: Tensor, kept: Tensor, positions: Tensor | None = None
    ) -> Tensor | None:
        """The block's correction from masks `ablate` / `kept` [n_sources, n_destinations]: [rows, P, n, d],
        or at `positions` only, [m, n, d]; None when nothing into the block is ablated."""
        n = self.prefix[cols.start]
        if not bool(self.seen[:n].all()):
            raise AssertionError(f"destinations {cols} read sources not yet computed")
        ablate, kept = ablate[:n, cols], kept[:n, cols]
        ablated_sources = ablate.amax(1).nonzero()[:, 0]
        if ablated_sources.numel() == 0:
            return None
        kept_sources = kept.amax(1).nonzero()[:, 0]
        if ablated_sources.numel() <= kept_sources.numel() + 1:
            return self._weighted(ablated_sources, ablate, positions)
        total = self.total
        for later in _runs(self.seen, n):  # recorded, but after what these destinations read
            for _, diff in self.diff.matrices(later):
                total = total - diff.sum(0).view_as(total).to(total)
        if positions is not None:
            total = total.reshape(-1, total.shape[-1])[positions.to(total.device)]
        return total.unsqueeze(-2) - self._weighted(kept_sources, kept, positions)


class _SpanShared(_Shared):
    """One mask per span for all rows, [S, n_sources, n_destinations]: `_Shared`'s sums taken span by
    span over the positions of each span (`span_index` [rows, P]), each from its sparser side."""

    def __init__(
        self,
        graph: Graph,
        masks: Tensor,
        patch: SourceOutputs,
        rows: int,
        placement: Placement,
        span_index: Tensor,
    ) -> None:
        super().__init__(graph, masks[0], patch, rows, placement)
        self.masks, self.kept_masks = masks, graph.valid.to(masks.device) & ~masks
        flat = span_index.reshape(-1)
        self.positions = [(flat == span).nonzero()[:, 0] for span in range(masks.shape[0])]

    def correction(self, cols: slice) -> Tensor | None:
        rows, n_pos, d = self.total.shape
        out: Tensor | None = None
        for span, positions in enumerate(self.positions):
            if positions.numel() == 0:
                continue
            part = self._summed(cols, self.masks[span], self.kept_masks[span], positions)
            if part is None:
                continue
            if out is None:
                out = self.total.new_zeros(rows * n_pos, part.shape[1], d)
            out[positions.to(out.device)] = part.to(out)
        return None if out is None else out.view(rows, n_pos, -1, d)


def _runs(mask: Tensor, start: int) -> list[slice]:
    """The runs of consecutive True entries of the bool vector `mask` from index `start` on."""
    ids = mask[start:].nonzero()[:, 0] + start
    if ids.numel() == 0:
        return []
    bounds = [0, *((ids[1:] - ids[:-1] != 1).nonzero()[:, 0] + 1).tolist(), ids.numel()]
    return [slice(int(ids[a]), int(ids[b - 1]) + 1) for a, b in pairwise(bounds)]


class _Weighted(_Corrections):
    """Weighted ablation under autograd: the differences are kept source-major per recorded block
    ([k, rows * P * d], never written in place, so autograd may save them) and each destination block
    sums them weighted with one matmul per source block.

    With weights that need no gradient (ablation_gradient's 0/1 mask), each block's sum is taken from
    the sparser side, as in `_Shared`: sum_u w_u diff_u, or T + sum_u (w_u - 1) diff_u with T the running
    total of the differences, visiting only sources whose coefficient is not zero. The backward pass then
    costs a few small matmuls per block, not a copy of every source's difference."""

    def __init__(self, graph: Graph, weights: Tensor, patch: SourceOutputs) -> None:
        self.weights = weights  # [n_sources, n_destinations]
        self.sparse = not weights.requires_grad
        self.prefix = graph.valid_prefixes()
        self.patch = patch  # [1 or rows, P, n_sources, d]
        self.blocks: list[tuple[Tensor, Tensor]] = []  # (source ids, diff [k, rows * P * d])
        self.totals: list[Tensor] = []  # [rows * P * d]: sum of the differences up to each block
        self.shape: tuple[int, ...] = ()  # (rows, P, d)

    def wanted(self, ids: Tensor) -> Tensor:
        return torch.arange(ids.numel())

    def record(self, ids: Tensor, value: Tensor) -> None:
        patch = self.patch.select(slice(int(ids[0]), int(ids[-1]) + 1))  # one layer's sources
        diff = (patch.to(value) - value).permute(2, 0, 1, 3)  # [k, rows, P, d]
        if self.source_factor is not None:
            diff = diff * self.source_factor[ids.cpu()].to(diff).view(-1, 1, 1, 1)
        self.shape = tuple(diff.shape[1:])
        flat = diff.reshape(diff.shape[0], -1)
        self.blocks.append((ids, flat))
        if self.sparse:
            total = flat.sum(0)  # on the block's device; a model over several devices has blocks on each
            self.totals.append(total if not self.totals else self.totals[-1].to(total.device) + total)

    def correction(self, cols: slice) -> Tensor | None:
        n = self.prefix[cols.start]
        blocks = [(ids, diff) for ids, diff in self.blocks if int(ids[0]) < n]
        weights = self.weights[:n, cols]
        base = 1.0 if self.sparse and int((weights != 1).sum()) < int((weights != 0).sum()) else 0.0
        out: Tensor | None = (
            self.totals[len(blocks) - 1].repeat(weights.shape[1], 1) if base else None
        )  # [n_block, rows * P * d], summed into in place
        for ids, diff in blocks:
            w = weights[ids.to(weights.device)].to(diff) - base  # [k, n_block]
            if self.sparse:
                used = w.ne(0).any(1).nonzero()[:, 0]
                if used.numel() == 0:
                    continue
                if used.numel() < ids.numel():
                    diff, w = diff[used.to(diff.device)], w[used]
            if out is None:
                out = w.T @ diff
            elif out.device == diff.device:
                out.addmm_(w.T, diff)
            else:  # a block on another device than the first contribution
                out += (w.T @ diff).to(out.device)
        if out is None:
            return None
        return out.reshape(-1, *self.shape).permute(1, 2, 0, 3)  # [rows, P, n_block, d]

    def stacked(self) -> list[tuple[int, Tensor]]:
        """Every recorded difference, detached: (first source, [k, rows * P * d]) for each run of blocks
        kept on one device (one entry for a model on one device)."""
        runs: list[tuple[int, list[Tensor]]] = []
        for ids, diff in sorted(self.blocks, key=lambda block: int(block[0][0])):  # by source, not arrival
            if runs and runs[-1][1][0].device == diff.device:
                runs[-1][1].append(diff.detach())
            else:
                runs.append((int(ids[0]), [diff.detach()]))
        return [(first, torch.cat(diffs)) for first, diffs in runs]


def forward_with_span_ablation(
    model: HookedModel,
    graph: Graph,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    ablated: Tensor | SourceOutputs,
    span_mask: Tensor,
    span_index: Tensor,
    crossing_mask: Tensor | None = None,
    ablated_inputs: dict[tuple[int, str], Tensor] | None = None,
) -> Tensor:
    """Logits [b, P, d_vocab] of a position-aware circuit's run (`circuits.span_graph`): span edges ablated
    at their span's positions and crossing edges ablated inside attention.

    Crossing edge (k / v span a, query span b, head h) ablated: at its queries in span b, head h reads the
    ablated key (value) inputs at span a's positions, and the circuit's own elsewhere. The batch runs as
    two copies: the first is the circuit's run, the second reads every key and value input ablated. At
    each attention layer with head nodes, the first copy's scores take the second's where a key is
    ablated, the softmax is recomputed, and the pattern is split between the copies by where a value is
    ablated; the two copies' head outputs are summed and written into both, so that the copies' residual
    streams stay equal. Needs each layer's pattern to be the softmax of its scores (checked as it runs).

    Args:
        input_ids: [b, P].
        ablated: [b or 1, P, n_sources, d_model] the source outputs span edges carry when ablated.
        span_mask: bool [S, n_sources, n_destinations], the span edges to ablate.
        span_index: [b, P] each position's span, -1 on padding.
        crossing_mask: bool [S, S, n_sources, 2], the crossing edges to ablate (None: none).
        ablated_inputs: (layer, "k" / "v") -> [b, P, width] the key (value) inputs a crossing edge
            carries when ablated (`attribution.crossing.ablated_head_inputs`); needed with `crossing_mask`.
    """
    b, n_pos = input_ids.shape
    if crossing_mask is None or not _crossing_matters(model, graph, span_mask, crossing_mask):
        return forward_with_ablation(model, graph, input_ids, attention_mask, ablated, span_mask, span_index)
    assert crossing_mask is not None and ablated_inputs is not None, "crossing edges need ablated_inputs"
    problem = probed(model, "pattern", pattern_problem)
    if problem:
        raise UnsupportedModelError(
            f"{model.spec.name}: crossing edges are ablated by editing the attention pattern, and {problem}; "
            "evaluate circuits that keep every crossing edge, or score them only"
        )
    ids = input_ids.repeat(2, 1)
    mask = None if attention_mask is None else attention_mask.repeat(2, 1)
    patch = _rows_dividing(ablated, b, n_pos)
    spans = span_index[:, :n_pos].to(input_ids.device)
    edges = span_mask.to(input_ids.device) & graph.valid.to(input_ids.device)
    placement = source_placement(model, graph)
    sums = _SpanShared(graph, edges, _tiled(patch, 2 * b), 2 * b, placement, spans.repeat(2, 1))
    # the heads' outputs are summed before the ablation hooks record them; the key and value inputs of
    # the second copy are set after the ablation hooks have rebuilt them
    before: list[tuple[str, HookFn]] = []
    after: list[tuple[str, HookFn]] = []
    for site in wiring(model, graph.spec).sources:
        if site.per_head:
            ablate = crossing_mask[:, :, site.sources]
            layer_hooks = _crossing_hooks(model, site.layer, ablate, spans, ablated_inputs)
            before.append(layer_hooks[-1])
            after += layer_hooks[:-1]
    hooks = [*before, *_ablation_hooks(model, graph, sums), *after]
    with torch.no_grad(), model.hooks(hooks):
        return model(ids, mask)[:b]


def _crossing_matters(model: HookedModel, graph: Graph, span_mask: Tensor, crossing_mask: Tensor) -> bool:
    """Whether some ablated crossing edge leaves a key / value input whose circuit value is not already
    its ablated one: one with a span edge kept into it at the crossing edge's key span. (A k / v input
    with every edge into it ablated is the ablated input itself, so the crossing edges out of it change
    nothing, and the run needs no second copy: e.g. the empty circuit.)"""
    kept = graph.valid.to(span_mask.device) & ~span_mask  # [S, n_src, n_dst]
    for site in wiring(model, graph.spec).sources:
        if not site.per_head:
            continue
        for i, letter in enumerate(("k", "v")):
            cols = graph.qkv_destinations(site.layer, letter)  # type: ignore[arg-type]
            group = graph.spec.n_heads // (cols.stop - cols.start)
            fed = kept[:, :, cols].amax(1)  # [S_a, n_kv]: an edge kept into the input at span a
            cut = crossing_mask[:, :, site.sources, i].amax(1).to(fed.device)  # [S_a, H]: ablated somewhere
            by_group = cut.reshape(cut.shape[0], -1, group).amax(-1)  # [S_a, n_kv]
            if bool((fed & by_group).any()):
                return True
    return False


def _crossing_hooks(
    model: HookedModel,
    layer: int,
    ablate: Tensor,
    spans: Tensor,
    ablated_inputs: dict[tuple[int, str], Tensor],
) -> list[tuple[str, HookFn]]:
    """One layer's hooks for `forward_with_span_ablation`, the one summing the copies' head outputs last;
    ablate: bool [S, S, n_heads, 2]."""
    index = spans.clamp(min=0)
    # [b, H, Q, K]: is the key (value) at position p ablated for head h's query at q
    per_pair = ablate.to(spans.device)[index[:, None, :], index[:, :, None]]  # [b, Q, K, H, 2]
    keys, values = per_pair[..., 0].permute(0, 3, 1, 2), per_pair[..., 1].permute(0, 3, 1, 2)
    state: dict[str, Tensor] = {}

    def second_copy_reads(letter: str) -> HookFn:
        value = ablated_inputs[(layer, letter)]

        def hook(x: Tensor) -> Tensor:
            b = x.shape[0] // 2
            return torch.cat([x[:b], value.to(x).reshape(x[b:].shape)])

        return hook

    def mixed_scores(s: Tensor) -> None:
        b = s.shape[0] // 2
        state["clean"] = s[:b].float()
        mixed = torch.where(keys.to(s.device), s[b:], s[:b])
        state["pattern"] = torch.softmax(mixed.float(), dim=-1)

    def split_pattern(pattern: Tensor) -> Tensor:
        b = pattern.shape[0] // 2
        if not torch.allclose(torch.softmax(state.pop("clean"), -1), pattern[:b].float(), atol=1e-4):
            raise UnsupportedModelError(
                f"{model.spec.name}: layer {layer}'s attention pattern is not the softmax of its scores "
                "(sinks or another normalisation), so crossing edges cannot be ablated by recomputing it"
            )
        new = state.pop("pattern")
        on_values = values.to(new)
        return torch.cat([new * (1 - on_values), new * on_values]).to(pattern)

    def summed(z: Tensor) -> Tensor:
        b = z.shape[0] // 2
        total = z[:b] + z[b:]
        return torch.cat([total, total])

    return [
        (model.head_input_hook(layer, "k"), second_copy_reads("k")),
        (model.head_input_hook(layer, "v"), second_copy_reads("v")),
        (model.attn_scores_hook(layer), mixed_scores),
        (model.attn_pattern_hook(layer), split_pattern),
        (model.head_z_hook(layer), summed),
    ]
