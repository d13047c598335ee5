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

import torch
from torch import Tensor

from circuits.data import PromptPairs
from circuits.errors import InputError
from circuits.graph import Graph
from circuits.models.hooked import QKV, HookedModel
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
        """`pairs` carrying `spans` (`Spans.attach`), checked to follow this graph's schema."""
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

    def __repr__(self) -> str:
        return (
            f"SpanGraph({self.graph.spec.name}, spans {list(self.names)}: "
            f"{self.n_edges} span edges, {int((self.in_graph & self.valid).sum())} in the circuit)"
        )
