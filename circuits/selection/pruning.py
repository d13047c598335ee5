"""From scores to circuits: top-n, threshold and greedy selection at edge or node level, then pruning.

Sign convention (as EAP-IG): a score estimates M(edge ablated) - M(clean), so an edge that helps the metric
has a negative score. `absolute=True` ranks by |score|; `absolute=False` ranks by how much the edge helps
(-score), the "signed" selection of MIB's CPR.

Pruning removes edges that cannot matter under ablation: an edge whose source cannot be reached from the
input through the circuit (its output is then the ablated one anyway) or whose destination feeds nothing
that reaches the logits. Every function returns a new graph; the caller's is never modified.
"""

from __future__ import annotations

import heapq
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from circuits.errors import CircuitsWarning, InputError, NumericalError

if TYPE_CHECKING:
    from circuits.graph import Graph


def ranking(graph: Graph, scores: Tensor, absolute: bool) -> Tensor:
    """The ranking of `scores` (edge [n_src, n_dst] or node [n_src]); NaN scores are refused, all-zero
    (never scored) ones warned about."""
    real = scores[graph.valid] if scores.shape == graph.valid.shape else scores
    if bool(real.isnan().any()):
        raise NumericalError(
            f"{int(real.isnan().sum())} scores are NaN, so no ranking of them means anything; rescore "
            "with a finite metric"
        )
    if not bool(real.any()):
        warnings.warn(
            "every score is 0: this graph looks never scored (run circuits.attribute on it first), so the "
            "selection is arbitrary",
            CircuitsWarning,
            stacklevel=3,
        )
    return scores.abs() if absolute else -scores


def check_size(n: object, name: str, most: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= most:
        raise InputError(f"{name} must be a whole number in [0, {most}], got {n!r}")


def with_edges(graph: Graph, chosen: Tensor, prune: bool) -> Graph:
    circuit = graph.copy()
    circuit.in_graph = chosen & graph.valid
    if prune:
        prune_dead(circuit)
    else:
        circuit.nodes_in_graph = nodes_touched(circuit)
    return circuit


def top_n(graph: Graph, n: int, absolute: bool = True, prune: bool = True) -> Graph:
    """The `n` best-ranked valid edges (fewer after pruning)."""
    check_size(n, "n", graph.n_edges)
    rank = ranking(graph, graph.scores, absolute).masked_fill(~graph.valid, float("-inf")).flatten()
    chosen = torch.zeros(rank.numel(), dtype=torch.bool)
    chosen[rank.topk(n, sorted=False).indices] = True
    return with_edges(graph, chosen.reshape(graph.valid.shape), prune)


def threshold(graph: Graph, t: float, absolute: bool = True, prune: bool = True) -> Graph:
    """The valid edges ranked at least `t` (|score| >= t, or -score >= t when signed)."""
    return with_edges(graph, ranking(graph, graph.scores, absolute) >= t, prune)


def greedy(graph: Graph, n: int, absolute: bool = True, prune: bool = True) -> Graph:
    """Grow a circuit from the logits: repeatedly add the best-ranked edge into a node already in it.

    Every edge added is connected to the logits by construction; the source of each new edge joins the
    circuit and its own inputs become candidates.
    """
    check_size(n, "n", graph.n_edges)
    rank = ranking(graph, graph.scores, absolute)
    valid = graph.valid
    inputs_of = destinations_of_sources(graph)
    heap: list[tuple[float, int, int]] = []
    opened = torch.zeros(graph.n_destinations, dtype=torch.bool)

    def open_destination(col: int) -> None:
        if opened[col]:
            return
        opened[col] = True
        rows = valid[:, col].nonzero()[:, 0]
        for row, value in zip(rows.tolist(), rank[rows, col].tolist()):
            heapq.heappush(heap, (-value, row, col))

    open_destination(graph.logits_destination)
    chosen = torch.zeros_like(valid)
    added = 0
    while added < n and heap:
        _, row, col = heapq.heappop(heap)
        chosen[row, col] = True
        added += 1
        for dst in inputs_of[row]:
            open_destination(dst)
    return with_edges(graph, chosen, prune)


def top_nodes(graph: Graph, k: int, absolute: bool = True, prune: bool = True) -> Graph:
    """The circuit of the `k` best-ranked nodes by `graph.node_scores` (input and logits always in):
    every valid edge between kept nodes."""
    if graph.node_scores is None:
        raise InputError("node-level selection needs node scores: run attribute(..., level='node') first")
    if graph.node_magnitudes and not absolute:
        raise InputError(
            "these node scores are magnitudes (AtP*'s GradDrop sums |.|, all >= 0), so a signed selection "
            "would keep the least important nodes first: select with absolute=True (the |score| curve, CMD's)"
        )
    n_nodes = graph.n_sources - 1
    check_size(k, "k", n_nodes)
    rank = ranking(graph, graph.node_scores.nan_to_num(0.0), absolute)
    rank[0] = float("inf")  # the input is always kept
    kept = torch.zeros(graph.n_sources, dtype=torch.bool)
    kept[rank.topk(k + 1).indices] = True
    dst_kept = (destination_owners(graph) & kept[None, :]).amax(1)
    dst_kept[graph.logits_destination] = True
    circuit = with_edges(graph, kept[:, None] & dst_kept[None, :], prune)
    return circuit


def destination_owners(graph: Graph) -> Tensor:
    """bool [n_destinations, n_sources]: which nodes read each destination (a k/v input feeds every query
    head of its key-value group, or a layer's one attention source or mixer; logits feed no source)."""
    owners = torch.zeros(graph.n_destinations, graph.n_sources, dtype=torch.bool)
    spec = graph.spec
    group = torch.arange(spec.n_heads) // (spec.n_heads // spec.n_kv_heads)
    for layer in range(spec.n_layers):
        heads = torch.arange(graph.n_sources)[graph.head_sources(layer)]
        if not (spec.per_head_sources and spec.has_attention(layer)):
            owners[graph.mixer_inputs(layer), heads] = True  # one node (post-norm attention, a mixer)
        else:
            q = graph.qkv_destinations(layer, "q")
            owners[torch.arange(q.start, q.stop), heads] = True
            for letter in ("k", "v"):
                cols = graph.qkv_destinations(layer, letter)
                owners[cols.start + group, heads] = True
        if layer in spec.parallel_mixer_layers:  # a mixer beside the heads reads its own input
            mixer_dst, mixer_src = graph.parallel_mixer(layer)
            owners[mixer_dst, mixer_src] = True
        if spec.has_mlp(layer):
            owners[graph.mlp_destination(layer), graph.mlp_source(layer)] = True
    return owners


def destinations_of_sources(graph: Graph) -> list[list[int]]:
    """For each source node, the destinations (its q/k/v or MLP inputs) it reads."""
    rows, cols = destination_owners(graph).T.nonzero(as_tuple=True)
    inputs: list[list[int]] = [[] for _ in range(graph.n_sources)]
    for r, c in zip(rows.tolist(), cols.tolist()):
        inputs[r].append(c)
    return inputs


def prune_dead(circuit: Graph) -> None:
    """In place: drop edges not on an input -> logits path of the circuit; update `nodes_in_graph`.

    One forward sweep (which nodes the input reaches) and one backward sweep (which destinations reach
    the logits), layer by layer over column / row blocks; one pass reaches the fixed point. (Reductions use
    `amax`: torch's bool `any` over a dimension is orders of magnitude slower on CPU.)
    """
    edges = circuit.in_graph & circuit.valid
    edges_into = edges.T.contiguous()  # [n_dst, n_src]: a destination block's rows are contiguous
    owners = destination_owners(circuit)  # [n_dst, n_src]
    reached = torch.zeros(circuit.n_sources, dtype=torch.bool)
    reached[0] = True
    for layer in range(circuit.spec.n_layers):
        for block, nodes in _layer_blocks(circuit, layer):
            live_dst = (edges_into[block] & reached[None, :]).amax(1)  # [n block destinations]
            reached[nodes] = (owners[block][:, nodes] & live_dst[:, None]).amax(0)
    useful_dst = torch.zeros(circuit.n_destinations, dtype=torch.bool)
    useful_dst[circuit.logits_destination] = True
    for layer in reversed(range(circuit.spec.n_layers)):
        for block, nodes in reversed(_layer_blocks(circuit, layer)):
            useful_src = (edges[nodes] & useful_dst[None, :]).amax(1)  # [n nodes]
            useful_dst[block] = (owners[block][:, nodes] & useful_src[None, :]).amax(1)
    circuit.in_graph = edges & reached[:, None] & useful_dst[None, :]
    circuit.nodes_in_graph = nodes_touched(circuit)


def _layer_blocks(graph: Graph, layer: int) -> list[tuple[slice, slice]]:
    """(destination columns, source nodes) of a layer's attention, then of its MLP, in forward order."""
    blocks = [(graph.mixer_inputs(layer), graph.head_sources(layer))]
    if layer in graph.spec.parallel_mixer_layers:  # beside the heads: reads and writes with them
        mixer_dst, mixer_src = graph.parallel_mixer(layer)
        blocks.append((slice(mixer_dst, mixer_dst + 1), slice(mixer_src, mixer_src + 1)))
    if graph.spec.has_mlp(layer):
        mlp_dst, mlp_src = graph.mlp_destination(layer), graph.mlp_source(layer)
        blocks.append((slice(mlp_dst, mlp_dst + 1), slice(mlp_src, mlp_src + 1)))
    return blocks


def nodes_touched(circuit: Graph) -> Tensor:
    """bool [n_sources]: nodes with an edge out of them in the circuit (after pruning: the live nodes)."""
    return (circuit.in_graph & circuit.valid).amax(1)
