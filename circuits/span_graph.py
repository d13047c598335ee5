"""`SpanGraph`: a model's graph with a node per (site, span), for position-aware circuits (PEAP: Haklay et
al., ACL 2025, arXiv 2502.04577).

Nodes are a source or destination of `Graph` at one span of a schema (`circuits.spans`): "a3.h1 at the
subject" and "a3.h1 at the end" are different nodes. Two kinds of edges:
- span edges u@s -> v@s, along the residual stream at the positions of span s (u writes there, v reads
  there): one per edge of `Graph` and span, so their scores summed over spans are the position-summed
  scores of the same method;
- crossing edges inside attention (see `crossing`), from a head's key or value input at span a to the
  head's output at a span b >= a.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from circuits.data import PromptPairs
from circuits.errors import FileFormatError, GraphMismatchError, InputError
from circuits.graph import Graph
from circuits.models.hooked import QKV, HookedModel
from circuits.selection.pruning import _layer_blocks, destination_owners, destinations_of_sources
from circuits.spans import Spans, check_schema

LETTERS: tuple[QKV, QKV] = (
    "k",
    "v",
)  # the inputs of crossing edges, in the order of their scores' last dimension


def crossing_valid(graph: Graph, n_spans: int, heads: list[int]) -> Tensor:
    """bool [S, S, n_sources, 2]: crossing edge (key / value span a, query span b, head source, letter)
    exists when a <= b and the source is a head of `heads` (source indices)."""
    valid = torch.zeros(n_spans, n_spans, graph.n_sources, len(LETTERS), dtype=torch.bool)
    order = torch.ones(n_spans, n_spans, dtype=torch.bool).triu()  # [a, b]: a <= b
    valid[:, :, heads] = order[:, :, None, None]
    return valid


class SpanGraph:
    """A `Graph` per span of a schema, with edge scores and a circuit mask per span.

    Attributes:
        graph: the position-agnostic graph (sources, destinations, which edges exist).
        names: the schema's S span names, the last one `end`.
        scores: [S, n_sources, n_destinations] span edge scores.
        node_scores: [S, n_sources] or None.
        in_graph: bool [S, n_sources, n_destinations], the circuit's span edges.
        crossing_scores: [S, S, n_sources, 2] crossing edge scores (`crossing_valid`).
        in_crossing: bool [S, S, n_sources, 2], the circuit's crossing edges.
    """

    def __init__(self, graph: Graph, names: tuple[str, ...] | list[str]) -> None:
        if not isinstance(graph, Graph):
            raise InputError(f"SpanGraph needs a Graph, got {type(graph).__name__}")
        self.graph = graph
        self.names = tuple(names)
        check_schema(self.names)
        shape = (len(self.names), *graph.valid.shape)
        self.scores = graph.scores.new_zeros(shape)
        self.node_scores: Tensor | None = None
        self.in_graph = self.valid.clone()
        self.crossing_scores = self.scores.new_zeros(self.crossing_valid.shape)
        self.in_crossing = self.crossing_valid.clone()
        self.metric: str | None = None

    @classmethod
    def from_model(cls, model: HookedModel, spans: Spans | tuple[str, ...] | list[str]) -> SpanGraph:
        """The full graph of `model` per span of a schema (a `Spans` or its names)."""
        names = spans.names if isinstance(spans, Spans) else spans
        return cls(Graph.from_model(model), names)

    def copy(self) -> SpanGraph:
        """An independent copy (tensors cloned)."""
        new = SpanGraph(self.graph.copy(), self.names)
        new.scores, new.in_graph = self.scores.clone(), self.in_graph.clone()
        new.crossing_scores, new.in_crossing = self.crossing_scores.clone(), self.in_crossing.clone()
        new.node_scores = None if self.node_scores is None else self.node_scores.clone()
        new.metric = self.metric
        return new

    @property
    def valid(self) -> Tensor:
        """bool [S, n_sources, n_destinations]: every edge of `graph` at every span."""
        return self.graph.valid.expand(len(self.names), -1, -1)

    @property
    def crossing_valid(self) -> Tensor:
        """bool [S, S, n_sources, 2]: crossing edge (key / value span a, query span b, head, k / v) exists
        when a <= b and the source is a head (a post-norm layer's attention node has no heads)."""
        heads = [i for i, name in enumerate(self.graph.sources) if self.graph.node_kind(name) == "head"]
        return crossing_valid(self.graph, len(self.names), heads)

    @property
    def n_edges(self) -> int:
        """Span edges and crossing edges."""
        return len(self.names) * self.graph.n_edges + int(self.crossing_valid.sum())

    def attach(self, spans: Spans | None, pairs: PromptPairs) -> PromptPairs:
        """`pairs` carrying `spans` (`Spans.attach`), checked to follow this graph's schema; without
        `spans`, pairs that carry theirs already (e.g. a slice of attached pairs)."""
        if spans is None and pairs.span_index is not None:
            index = pairs.span_index
            if int(index.max()) >= len(self.names):
                raise InputError(f"the pairs carry spans beyond this graph's {len(self.names)}")
            return pairs
        if spans is None:
            raise InputError(
                "a SpanGraph is scored per span: give the prompts' spans (spans=..., e.g. the task's "
                "`spans`, or Spans.from_differences(pairs))"
            )
        if spans.names != self.names:
            raise InputError(f"the spans follow schema {list(spans.names)}, the graph {list(self.names)}")
        return spans.attach(pairs)

    def position_summed(self) -> Graph:
        """A copy of `graph` scored with the span scores summed over spans (today's position sums)."""
        summed = self.node_scores.sum(0) if self.node_scores is not None else None
        scored = self.graph.with_scores(self.scores.sum(0), summed)
        scored.metric = self.metric
        return scored

    @property
    def n_in_graph(self) -> int:
        """Span edges and crossing edges in the circuit."""
        return int((self.in_graph & self.valid).sum()) + int((self.in_crossing & self.crossing_valid).sum())

    # -------------------------------------------------------------------- selection (copies)
    def top_n(self, n: int, absolute: bool = True, prune: bool = True) -> SpanGraph:
        """A copy whose circuit is the `n` best-ranked span and crossing edges (ranked together, by |score|
        or by score), then pruned to the edges on an input -> logits path."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InputError(f"n must be a count of edges (an int >= 0), got {n!r}")
        span, crossing = self.scores, self.crossing_scores
        ranked = torch.cat(
            [_rank(span, absolute)[self.valid], _rank(crossing, absolute)[self.crossing_valid]]
        )
        chosen = torch.zeros(ranked.numel(), dtype=torch.bool)
        chosen[torch.topk(ranked, min(n, ranked.numel())).indices] = True
        circuit = self.copy()
        n_span = int(self.valid.sum())
        circuit.in_graph = torch.zeros_like(self.in_graph)
        circuit.in_graph[self.valid] = chosen[:n_span]
        circuit.in_crossing = torch.zeros_like(self.in_crossing)
        circuit.in_crossing[self.crossing_valid] = chosen[n_span:]
        if prune:
            prune_dead(circuit)
        return circuit

    def greedy(self, n: int, absolute: bool = True, prune: bool = True) -> SpanGraph:
        """A copy whose circuit grows from the logits at the last span (PEAP's search): repeatedly add the
        best-ranked span or crossing edge into a node already in the circuit. A head at span b reads its q
        input at b and, through crossing edges, its k / v inputs at spans a <= b; a k / v input at a
        joins when a crossing edge from it does; a mixer or one attention node reads its inputs at every
        span a <= b."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InputError(f"n must be a count of edges (an int >= 0), got {n!r}")
        graph, n_spans = self.graph, len(self.names)
        span_rank, crossing_rank = _rank(self.scores, absolute), _rank(self.crossing_scores, absolute)
        inputs_of = destinations_of_sources(graph)
        heads = [graph.node_kind(name) == "head" for name in graph.sources]
        mixing = [graph.node_kind(name) in ("mixer", "attention") for name in graph.sources]
        heap: list[tuple[float, int, tuple[int, ...]]] = []  # (-rank, 0 span / 1 crossing, index)
        opened: set[tuple[int, int]] = set()  # (destination, span) whose edges are candidates
        joined: set[tuple[int, int]] = set()  # (source, span) in the circuit

        def open_input(dst: int, span: int) -> None:
            if (dst, span) in opened:
                return
            opened.add((dst, span))
            rows = self.graph.valid[:, dst].nonzero()[:, 0]
            for row, value in zip(rows.tolist(), span_rank[span, rows, dst].tolist()):
                heapq.heappush(heap, (-value, 0, (span, row, dst)))

        def join(source: int, span: int) -> None:
            if (source, span) in joined:
                return
            joined.add((source, span))
            for dst in inputs_of[source]:
                letter = Graph.qkv_letter(graph.destinations[dst])
                if heads[source] and letter in LETTERS:  # keys / values: through crossing edges
                    index = LETTERS.index(letter)  # type: ignore[arg-type]
                    for a in range(span + 1):
                        value = float(crossing_rank[a, span, source, index])
                        heapq.heappush(heap, (-value, 1, (a, span, source, index)))
                elif mixing[source] and letter != "q":  # positions mixed inside: every earlier span
                    for a in range(span + 1):
                        open_input(dst, a)
                else:
                    open_input(dst, span)

        open_input(graph.logits_destination, n_spans - 1)
        circuit = self.copy()
        circuit.in_graph = torch.zeros_like(self.in_graph)
        circuit.in_crossing = torch.zeros_like(self.in_crossing)
        added = 0
        while added < n and heap:
            _, kind, index = heapq.heappop(heap)
            if kind == 0:
                span, row, dst = index
                circuit.in_graph[span, row, dst] = True
                join(row, span)
            else:
                a, b, head, letter = index
                circuit.in_crossing[a, b, head, letter] = True
                layer = graph.node_layer(graph.sources[head])
                assert layer is not None
                kv = graph.qkv_destinations(layer, LETTERS[letter])
                group = graph.spec.n_heads // (kv.stop - kv.start)
                open_input(kv.start + (head - graph.head_sources(layer).start) // group, a)
            added += 1
        if prune:
            prune_dead(circuit)
        return circuit

    def concrete_edges(self, spans: Spans) -> float:
        """The circuit's size as PEAP counts it, in edges between positions, averaged over the prompts of
        `spans`: a span edge at span s is n_s edges (one per position), a crossing edge from span a to a
        later span b is n_a n_b (every key position to every query position), within one span
        n_s (n_s + 1) / 2 (causal pairs)."""
        lengths = spans.lengths.double()  # [N, S]
        span_edges = (self.in_graph & self.valid).sum((1, 2)).double()  # [S]
        total = lengths @ span_edges
        crossing = (self.in_crossing & self.crossing_valid).sum((2, 3)).double()  # [S_a, S_b]
        pairs = lengths[:, :, None] * lengths[:, None, :]  # [N, S_a, S_b]
        diagonal = torch.eye(len(self.names), dtype=torch.bool)
        pairs[:, diagonal] = lengths * (lengths + 1) / 2
        total += (pairs * crossing).sum((1, 2))
        return float(total.mean())

    # ------------------------------------------------------------------------------------ files
    def edge_name(self, kind: str, index: tuple[int, ...]) -> str:
        """The file name of span edge (s, u, v) (`kind="span"`: `a0.h1@A->a2.h3<q>@A`) or crossing edge
        (a, b, h, letter) (`kind="crossing"`: the key / value input at a to the head at b,
        `a2.kv0<k>@S2->a2.h3@end`)."""
        g, names = self.graph, self.names
        if kind == "span":
            s, u, v = index
            return f"{g.sources[u]}@{names[s]}->{g.destinations[v]}@{names[s]}"
        a, b, h, letter = index
        layer, head = g.node_layer(g.sources[h]), g.node_head(g.sources[h])
        assert layer is not None and head is not None
        kv = g.qkv_destinations(layer, LETTERS[letter])
        group = g.spec.n_heads // (kv.stop - kv.start)
        return f"{g.destinations[kv.start + head // group]}@{names[a]}->{g.sources[h]}@{names[b]}"

    def to_json(self, path: str | Path, circuit_only: bool = False) -> None:
        """Write an EAP-IG-style circuit file whose edge names carry their spans (`edge_name`): `cfg`,
        `spans`, `edges` (score, in_graph), `metric`; scores as `attribute` gives them, M(ablated) -
        M(clean). `circuit_only`: the circuit's edges alone (a full file of a 135M model is large)."""
        edges: dict[str, dict[str, Any]] = {}
        for kind, valid, scores, kept in (
            ("span", self.valid, self.scores, self.in_graph),
            ("crossing", self.crossing_valid, self.crossing_scores, self.in_crossing),
        ):
            where = valid & kept if circuit_only else valid
            for index, score, flag in zip(
                where.nonzero().tolist(), scores[where].tolist(), kept[where].tolist()
            ):
                edges[self.edge_name(kind, tuple(index))] = {"score": score, "in_graph": bool(flag)}
        data = {
            "cfg": self.graph.cfg(),
            "spans": list(self.names),
            "nodes": {},
            "edges": edges,
            "metric": self.metric,
            "score_sign": "metric",
        }
        Path(path).write_text(json.dumps(data))

    @classmethod
    def from_json(cls, path: str | Path) -> SpanGraph:
        """Read a file written by `to_json` (edges it leaves out are outside the circuit, scored 0)."""
        where = str(path)
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FileFormatError(f"{where}: not a readable JSON file ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("spans"), list):
            raise FileFormatError(f"{where}: not a position-aware circuit file (no `spans` list)")
        graph = Graph.from_dict({"cfg": data.get("cfg"), "nodes": {}, "edges": {}}, where)
        n_kv = data["cfg"].get("n_key_value_heads") if isinstance(data.get("cfg"), dict) else None
        names = " ".join(data.get("edges", {}))
        if isinstance(n_kv, int) and 0 < n_kv < graph.spec.n_kv_heads and ".kv" in names:
            graph = Graph(replace(graph.spec, n_kv_heads=n_kv))  # this toolkit's grouped k / v inputs
        circuit = cls(graph, tuple(data["spans"]))
        circuit.metric = data.get("metric")
        circuit.in_graph[:] = False
        circuit.in_crossing[:] = False
        span = {name: i for i, name in enumerate(circuit.names)}
        for name, info in dict(data.get("edges", {})).items():
            field = f"{where}: edges[{name!r}]"
            try:
                (left, a), (right, b) = (side.rsplit("@", 1) for side in name.split("->"))
                a_index, b_index = span[a], span[b]
            except (ValueError, KeyError):
                raise FileFormatError(
                    f"{field}: not `node@span->node@span` with spans {list(span)}"
                ) from None
            if not isinstance(info, dict) or not isinstance(info.get("in_graph", False), bool):
                raise FileFormatError(f"{field}: an object with a boolean in_graph")
            score = info.get("score", 0.0)
            if isinstance(score, bool) or not isinstance(score, int | float):
                raise FileFormatError(f"{field}.score: a number, got {score!r}")
            letter = Graph.qkv_letter(left)
            if letter is not None:  # from a key / value input: a crossing edge to a head
                if letter not in LETTERS or right not in graph.src_index or a_index > b_index:
                    raise GraphMismatchError(f"{field}: no such crossing edge")
                if graph.node_kind(right) != "head":
                    raise GraphMismatchError(f"{field}: no such crossing edge")
                index = (a_index, b_index, graph.src_index[right], LETTERS.index(letter))  # type: ignore[arg-type]
                circuit.crossing_scores[index] = float(score)
                circuit.in_crossing[index] = info.get("in_graph", False)
            else:
                if a_index != b_index:
                    raise GraphMismatchError(f"{field}: a span edge joins nodes of one span")
                u, v = graph.edge_index(f"{left}->{right}")
                circuit.scores[a_index, u, v] = float(score)
                circuit.in_graph[a_index, u, v] = info.get("in_graph", False)
        return circuit

    def __repr__(self) -> str:
        return (
            f"SpanGraph({self.graph.spec.name}, spans {list(self.names)}: {self.n_edges} span and crossing "
            f"edges, {self.n_in_graph} in the circuit)"
        )


def _rank(scores: Tensor, absolute: bool) -> Tensor:
    """As `selection.ranking`: by |score|, or signed with the edges that help the metric most (most
    negative, M(ablated) - M(clean) < 0) first."""
    return scores.abs() if absolute else -scores


def concrete_edges(circuit: Graph, spans: Spans) -> float:
    """A position-agnostic circuit's size counted as `SpanGraph.concrete_edges` counts it: each edge is one
    per position of a prompt (P), and a query head whose key (value) input the circuit feeds sees every key
    position from every query position, P (P + 1) / 2 edges; averaged over the prompts of `spans`."""
    lengths = spans.lengths.sum(1).double()  # [N] positions
    edges = circuit.in_graph & circuit.valid
    fed, speaks = edges.amax(0), edges.amax(1)  # destinations with an edge in, sources with one out
    owners = destination_owners(circuit)
    reads = 0
    for layer in range(circuit.spec.n_layers):
        if not (circuit.spec.per_head_sources and circuit.spec.has_attention(layer)):
            continue
        for letter in LETTERS:
            cols = circuit.qkv_destinations(layer, letter)
            readers = (owners[cols] & fed[cols, None]).amax(0)  # heads reading a fed key (value) input
            reads += int((readers & speaks).sum())
    return float((lengths * int(edges.sum()) + reads * lengths * (lengths + 1) / 2).mean())


def prune_dead(circuit: SpanGraph) -> None:
    """In place: keep only the span and crossing edges on a path from the input (at any span) to the logits.

    A destination at span a feeds its reader (`selection.pruning.destination_owners`) at span a (a q or MLP
    input), at a later or the same span b through the crossing edge (a head's k / v input), or at every
    span b >= a (a layer's one attention node, a mixer: no crossing edges, positions mixed inside).
    """
    graph, n_spans = circuit.graph, len(circuit.names)
    edges = circuit.in_graph & circuit.valid  # [S, n_src, n_dst]
    crossing = circuit.in_crossing & circuit.crossing_valid  # [S_a, S_b, n_src, 2]
    owners = destination_owners(graph)
    later = torch.ones(n_spans, n_spans, dtype=torch.bool).triu()  # [a, b]: a <= b
    same = torch.eye(n_spans, dtype=torch.bool)
    heads = torch.tensor([graph.node_kind(name) == "head" for name in graph.sources])
    letters = [Graph.qkv_letter(name) for name in graph.destinations]

    def spread(dst: int, node: int) -> Tensor:  # [S_a, S_b]: destination at a feeds the node at b
        letter = letters[dst]
        if letter in LETTERS:  # a head's key / value: through the crossing edges; one attention node: all
            return crossing[:, :, node, LETTERS.index(letter)] if bool(heads[node]) else later  # type: ignore[arg-type]
        mixes = letter is None and graph.node_kind(graph.sources[node]) == "mixer"
        return later if mixes else same

    reached = torch.zeros(n_spans, graph.n_sources, dtype=torch.bool)
    reached[:, 0] = True
    live_dst = torch.zeros(n_spans, graph.n_destinations, dtype=torch.bool)
    blocks = [block for layer in range(graph.spec.n_layers) for block in _layer_blocks(graph, layer)]
    for cols, nodes in blocks:
        live_dst[:, cols] = (edges[:, :, cols] & reached[:, :, None]).amax(1)
        for node in range(nodes.start, nodes.stop):
            fed = torch.zeros(n_spans, dtype=torch.bool)
            for dst in owners[cols, node].nonzero()[:, 0].tolist():
                fed |= (live_dst[:, cols.start + dst, None] & spread(cols.start + dst, node)).amax(0)
            reached[:, node] = fed
    useful_dst = torch.zeros(n_spans, graph.n_destinations, dtype=torch.bool)
    useful_dst[:, graph.logits_destination] = True
    useful_src = torch.zeros(n_spans, graph.n_sources, dtype=torch.bool)
    for cols, nodes in reversed(blocks):
        useful_src[:, nodes] = (edges[:, nodes] & useful_dst[:, None, :]).amax(-1)
        for dst in range(cols.start, cols.stop):
            for node in owners[dst].nonzero()[:, 0].tolist():
                useful_dst[:, dst] |= (spread(dst, node) & useful_src[None, :, node]).amax(1)
    circuit.in_graph = edges & reached[:, :, None] & useful_dst[:, None, :]
    kept = torch.zeros_like(crossing)
    for letter_index, letter in enumerate(LETTERS):
        for layer in range(graph.spec.n_layers):
            if not (graph.spec.per_head_sources and graph.spec.has_attention(layer)):
                continue
            cols = graph.qkv_destinations(layer, letter)
            head_nodes = graph.head_sources(layer)
            group = graph.spec.n_heads // (cols.stop - cols.start)
            kv = cols.start + torch.arange(graph.spec.n_heads) // group  # each head's k / v column
            live_kv = live_dst[:, kv]  # [S_a, H]: the head's key input at span a is fed
            useful = useful_src[:, head_nodes]  # [S_b, H]
            kept[:, :, head_nodes, letter_index] = live_kv[:, None, :] & useful[None, :, :]
    circuit.in_crossing = crossing & kept
