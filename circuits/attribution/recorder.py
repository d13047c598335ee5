"""The backward side shared by every gradient method: gradients turned into edge and node scores as they
arrive.

With the ablation differences delta in the source-major layout of `circuits.sources`, each destination
block's scores are one matmul `delta[:n_valid] @ grad_block` taken inside the backward hook, restricted to
the sources that can reach the block (no dense destination-gradient buffer, no upper-triangular work).

Gradients of IG steps stacked in the batch (rows k * b + i) are folded over steps with quadrature weights
before scoring. A head's q/k/v gradients are pulled back through the shared attention norm in one
vector-Jacobian product per layer, at the norm input's backward hook (which runs after q, k and v's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from circuits.graph import Graph
from circuits.models.hooked import QKV_LETTERS, HookedModel, HookFn
from circuits.models.wiring import DestinationSite, residual_factors, wiring
from circuits.sources import SourceOutputs


class ScoreRecorder:
    """Backward hooks adding, for the sources in `sources`, edge scores sum_{b,p} delta_u . g_v into
    `edges` [n_sources, n_destinations] and per-example node scores delta_u . g_u into `nodes` [b, n_sources]
    (with `edges`, only the input's: the other node scores are then the edge sums over destinations).

    With `span_index` [b, P] (each position's span, -1 on padding), the sums are split by span: `edges`
    is [S, n_sources, n_destinations] (span s sums over the positions in s, where the source writes and the
    destination reads: position-aware EAP's non-crossing edges, Haklay et al. 2025, arXiv 2502.04577), and
    node scores are [b, S, n_sources].

    Args:
        weights: [steps] quadrature weights; the forward batch holds steps x b rows, step-major.
        delta: [b, P, n_sources, d] ablated minus clean source outputs (kept beside the layers that wrote
            them); may be set after construction (before the backward pass), e.g. when it comes from the
            same forward pass.
        edges: accumulator, or None for node scores only.
        sources: the contiguous range of sources to score (all by default).
        frozen_scale: pull q/k/v (and shared-norm MLP) gradients back through the attention norm with its
            scale held constant, as RelP's LN rule does in the model's own backward.
        flush_columns: destinations whose gradients are queued before one score matmul.
        workspace: where the queue's storage is kept for the next recorder of the same shape.
        span_index: [b, P] long, the span of each position (None: positions summed).
        output_grads: where to add, per layer, the (folded) gradient at its heads' summed output
            [b, P, d_model] when the layer's heads are among `sources` (crossing edges,
            `attribution.crossing`).
    """

    def __init__(
        self,
        model: HookedModel,
        graph: Graph,
        weights: Tensor,
        edges: Tensor | None,
        nodes: Tensor,
        delta: SourceOutputs | None = None,
        sources: slice = slice(None),
        frozen_scale: bool = False,
        flush_columns: int = 64,
        workspace: dict[str, Tensor] | None = None,
        span_index: Tensor | None = None,
        output_grads: dict[int, Tensor] | None = None,
    ) -> None:
        self.model, self.graph, self.weights = model, graph, weights
        self.edges, self.nodes, self.delta = edges, nodes, delta
        self.flush_columns, self.frozen_scale = flush_columns, frozen_scale
        start, stop, _ = sources.indices(graph.n_sources)
        self.start, self.stop = start, stop
        self._resid: dict[int, Tensor] = {}
        self._qkv: dict[int, dict[str, Tensor]] = {}
        self._prefix = graph.valid_prefixes()
        self._workspace = {} if workspace is None else workspace
        self._pending: list[tuple[int, int]] = []  # (first destination, count) of the queued blocks
        self._n_pending = 0
        self._factors = residual_factors(model, graph.spec)  # layers rescaling the residual stream
        self._span_index = span_index
        self.output_grads = output_grads
        # per span, the flat (example, position) rows inside it
        self._span_rows = None if span_index is None else _rows_by_span(span_index, self._n_spans())

    def _n_spans(self) -> int:
        scores = self.edges if self.edges is not None else self.nodes
        return scores.shape[0] if self.edges is not None else scores.shape[1]

    # ---------------------------------------------------------------------------------- scoring
    def _fold(self, g: Tensor) -> Tensor:
        """[steps * b, ...] -> [b, ...] weighted sum over steps, in float32."""
        steps = self.weights.shape[0]
        g = g.float()
        if steps == 1 and float(self.weights[0]) == 1.0:
            return g
        g = g.reshape(steps, g.shape[0] // steps, *g.shape[1:])
        w = self.weights.to(g.device, torch.float32).reshape(steps, *([1] * (g.dim() - 1)))
        return (w * g).sum(0)

    def _queue(self, first: int, n: int, width: int) -> Tensor:
        """Rows [n, width] of the queue's storage for destinations first.., to be written by the caller;
        kept with the edge sums (a model spread over devices sends its layers' gradients there)."""
        assert self.edges is not None
        device = self.edges.device
        capacity = self.flush_columns + self.graph.spec.n_heads + 2 * self.graph.spec.n_kv_heads
        if self._n_pending + n > capacity:
            self.flush()
        storage = self._workspace.get("queue")
        if storage is None or storage.shape != (capacity, width) or storage.device != device:
            storage = torch.empty(capacity, width, device=device)
            self._workspace["queue"] = storage
        rows = storage[self._n_pending : self._n_pending + n]
        self._pending.append((first, n))
        self._n_pending += n
        return rows

    def _queued(self) -> None:
        if self._n_pending >= self.flush_columns:
            self.flush()

    def _score_edges(self, cols: int, g: Tensor) -> None:
        """Queue the folded gradient g [b, P, d] of destination `cols`."""
        self._queue(cols, 1, g.numel()).view_as(g).copy_(g)  # onto the scores' device
        self._queued()

    def flush(self) -> None:
        """Score the queued destinations in one matmul delta[rows] @ G^T, invalid pairs dropped.

        Batching destinations of a few layers keeps the matmul wide enough to be compute-bound, while
        restricting rows to the sources that reach any of them skips most of the upper triangle.
        """
        if not self._pending:
            return
        assert self.edges is not None and self.delta is not None, "delta must be set before the backward pass"
        firsts = [first for first, _ in self._pending]
        cols = torch.cat([torch.arange(first, first + n) for first, n in self._pending])
        grads = self._workspace["queue"][: self._n_pending]  # [N, b * P * d]
        self._pending, self._n_pending = [], 0
        rows = slice(self.start, min(max(self._prefix[f] for f in firsts), self.stop))
        if rows.stop <= rows.start:
            return
        targets = cols.to(self.edges.device)
        for sources, delta in self.delta.matrices(rows):  # [n, b * P * d] per device the sources are kept on
            valid = self.graph.valid[sources][:, cols].to(delta.device)
            if self._factors is not None:  # edge u -> v carries P_m / P_j times u's output
                source_factor, destination_factor = self._factors
                valid = valid * torch.outer(source_factor[sources], destination_factor[cols]).to(delta)
            on_device = grads.to(delta.device)
            if self._span_rows is None:
                scores = (delta @ on_device.T) * valid
                self.edges[sources, targets] += scores.to(self.edges.device)
                continue
            d = self.graph.spec.d_model
            per_row, grad_rows = delta.view(delta.shape[0], -1, d), on_device.view(on_device.shape[0], -1, d)
            for span, inside in enumerate(self._span_rows):  # [n, m * d] @ [m * d, N] for m positions
                if inside.numel():
                    inside = inside.to(delta.device)
                    part = per_row[:, inside].flatten(1) @ grad_rows[:, inside].flatten(1).T
                    self.edges[span, sources, targets] += (part * valid).to(self.edges.device)

    def backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        """Run the backward pass of `loss` through the hooks, then score what is still queued."""
        loss.backward(retain_graph=retain_graph)
        if self.edges is not None:
            self.flush()

    def _score_nodes(self, group: slice, g: Tensor) -> None:
        """g: [b, P, d], the gradient shared by the sources of `group`."""
        rows = slice(max(group.start, self.start), min(group.stop, self.stop))
        if rows.stop <= rows.start:
            return
        assert self.delta is not None, "delta must be set before the backward pass"
        b = g.shape[0]
        if self._span_index is not None and self.edges is None:  # [b, P, n] per position, then by span
            selected = self.delta.select(rows)
            per_position = (selected * g.unsqueeze(2).to(selected)).sum(-1)
            spans = _one_hot_spans(self._span_index, self.nodes.shape[1]).to(per_position)
            self.nodes[:, :, rows] += torch.einsum("bpn,bps->bsn", per_position, spans).to(self.nodes.device)
            return
        delta = self.delta.select(rows).permute(0, 2, 1, 3).reshape(b, rows.stop - rows.start, -1)
        scores = torch.bmm(delta, g.reshape(b, -1, 1).to(delta))[:, :, 0]  # [b, n]
        self.nodes[:, rows] += scores.to(self.nodes.device)

    # ------------------------------------------------------------------------------------ hooks
    @staticmethod
    def _on_grad(fn: Callable[[Tensor], None]) -> HookFn:
        """A forward hook returning a fresh view whose gradient (this branch only) is passed to fn."""

        def hook(x: Tensor) -> Tensor:
            y = x.view_as(x)
            if y.requires_grad:
                y.register_hook(lambda g: fn(g))
            return y

        return hook

    def _edge_hook(self, cols: int) -> HookFn:
        return self._on_grad(lambda g: self._score_edges(cols, self._fold(g)))

    def _node_hook(self, group: slice) -> HookFn:
        return self._on_grad(lambda g: self._score_nodes(group, self._fold(g)))

    def _output_grad_hook(self, layer: int) -> HookFn:
        def add(g: Tensor) -> None:
            assert self.output_grads is not None
            folded = self._fold(g)
            kept = self.output_grads
            kept[layer] = folded + kept[layer] if layer in kept else folded

        return self._on_grad(add)

    def _input_hook(self, site: DestinationSite) -> HookFn:
        """An MLP, mixer or logits destination's gradient: as it is, or pulled back through the attention
        norm it reads through (an MLP sharing it, a mixer beside attention)."""
        cols, layer = site.destinations.start, site.layer
        if site.residual_hook is None:
            return self._edge_hook(cols)
        pull_back = self.model.shared_norm_grads
        return self._on_grad(
            lambda g: self._score_edges(
                cols, pull_back(layer, self._resid[layer], g, self.weights, self.frozen_scale)
            )
        )

    def _qkv_hook(self, layer: int, letter: str) -> HookFn:
        """Keep the gradient at a q/k/v projection output; the norm hook pulls all three back at once."""

        def stash(g: Tensor) -> None:
            self._qkv.setdefault(layer, {})[letter] = g

        return self._on_grad(stash)

    def _attn_norm_hook(self, layer: int) -> HookFn:
        """Save the norm's input; on backward, score the layer's q, k, v destinations in one block."""
        graph = self.graph
        cols = slice(graph.qkv_destinations(layer, "q").start, graph.qkv_destinations(layer, "v").stop)
        on_grad = self._on_grad(lambda _g: self._score_qkv(layer, cols))

        def hook(x: Tensor) -> Tensor:
            self._resid[layer] = x.detach()
            return on_grad(x)  # type: ignore[return-value]

        return hook

    def _score_qkv(self, layer: int, cols: slice) -> None:
        stashed = self._qkv.pop(layer, {})
        if not stashed:
            return  # no gradient flowed into this layer's attention inputs
        like = next(iter(stashed.values()))
        spec = self.graph.spec

        def stashed_or_zero(letter: str, n: int, width: int) -> Tensor:
            # q and k get none with the attention pattern held constant (RelP's CP rule)
            return stashed[letter] if letter in stashed else like.new_zeros(*like.shape[:2], n * width)

        model = self.model
        per_head = [
            stashed_or_zero(letter, spec.n_qkv_heads(letter), model.qkv_width(layer, letter))
            for letter in QKV_LETTERS
        ]
        if model.head_gate_hook(layer) is not None:  # head h's q input also feeds its output gate
            gate = stashed_or_zero("gate", spec.n_heads, model.gate_width(layer))
            per_head[0] = model.join_gate(per_head[0], gate)
        resid = self._resid.pop(layer)
        width = resid.shape[0] // self.weights.shape[0] * resid.shape[1] * resid.shape[2]
        out = self._queue(cols.start, cols.stop - cols.start, width)
        on_layer = out if out.device == resid.device else None  # written into the queue where it lives
        grads = self.model.attn_input_grads(
            layer, resid, per_head, self.weights, out=on_layer, frozen_scale=self.frozen_scale
        )
        if on_layer is None:  # [b, P, n, d] -> the queue's rows [n, b * P * d]
            out.copy_(grads.permute(2, 0, 1, 3).reshape(out.shape))
        self._queued()

    def hooks(self) -> list[tuple[str, HookFn]]:
        sites = wiring(self.model, self.graph.spec)
        hooks: list[tuple[str, HookFn]] = []
        for dst in sites.destinations if self.edges is not None else ():
            match dst.kind:
                case "q" | "k" | "v":
                    if dst.kind == "q":  # the norm's hook scores the layer's q, k and v together
                        hooks.append((dst.residual_hook, self._attn_norm_hook(dst.layer)))  # type: ignore[arg-type]
                    hooks.append((dst.hook, self._qkv_hook(dst.layer, dst.kind)))  # type: ignore[arg-type]
                    if dst.gate_hook is not None:
                        hooks.append((dst.gate_hook, self._qkv_hook(dst.layer, "gate")))
                case "mlp" | "mixer" | "logits":
                    hooks.append((dst.hook, self._input_hook(dst)))
        for src in sites.sources:
            if self.output_grads is not None and src.per_head and self.start < src.sources.stop <= self.stop:
                hooks.append((src.output_hook, self._output_grad_hook(src.layer)))
            # the input's node scores per example (IG completeness); at edge level the others' node scores
            # are edge scores summed over destinations
            if src.kind == "input" or self.edges is None:
                hooks.append((src.output_hook, self._node_hook(src.sources)))
        return hooks


def _one_hot_spans(span_index: Tensor, n_spans: int) -> Tensor:
    """[b, P, S] one where a position is in a span (padding in none)."""
    one_hot = torch.nn.functional.one_hot(span_index.clamp(min=0), n_spans)
    return one_hot * (span_index >= 0).unsqueeze(-1)


def _rows_by_span(span_index: Tensor, n_spans: int) -> list[Tensor]:
    """For each span, the flat indices b * P + p of its positions in `span_index` [b, P]."""
    flat = span_index.reshape(-1).cpu()
    return [(flat == span).nonzero()[:, 0] for span in range(n_spans)]
