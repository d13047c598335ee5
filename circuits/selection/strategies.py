"""Selection strategies under an edge budget: the named ways of turning scores into a circuit of at most
so many edges that faithfulness curves, MIB's CPR / CMD and the CLI choose from.

A budget is counted by per-edge weights: one per edge of our graph, or MIB's count (`mib_edge_weights`,
where a GQA model's k/v edges count once per query head). Strategies:
- `top_n`: the best-ranked edges (signed or |score|), then pruned;
- `filled`: pruning-aware top-n: the longest ranking prefix whose *pruned* circuit fits, so that edges
  pruning removes do not waste the budget;
- `ratio` (`ratio_selection(positive)`): a share of the budget for the most helpful edges, the rest by
  |score| (after Nikankin et al. 2025, arXiv 2510.25786);
- `greedy`: grown from the logits (`selection.greedy`); `nodes`: the best nodes (`selection.top_nodes`);
- `random`: a baseline.
Score ensembles (Mondorf et al. 2025, arXiv 2510.06811) and bootstrap sign-consistency filtering
(`circuits.evaluation.intervals.sign_consistent`) change the scores a strategy ranks: see `ensemble_scores`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from circuits.errors import InputError
from circuits.graph import Graph
from circuits.selection.pruning import check_size, ranking, top_n, with_edges

Selection = Literal["top_n", "filled", "greedy", "nodes", "random"]
Selector = Callable[[Graph, int, bool, int, Tensor], Graph]  # (graph, budget, absolute, seed, weights)


def mib_edge_weights(graph: Graph) -> Tensor:
    """int [n_sources, n_destinations]: how many edges of EAP-IG's graph each edge stands for.

    MIB evaluates GQA models with their key-value heads ungrouped (one k and one v input per query head),
    so an edge into a shared k/v input is `n_heads / n_kv_heads` edges of its count; every other edge is one.
    """
    spec = graph.spec
    weights = torch.ones(graph.valid.shape, dtype=torch.long)
    for layer in spec.attention_layers:
        for letter in ("k", "v"):
            weights[:, graph.qkv_destinations(layer, letter)] = spec.n_heads // spec.n_kv_heads
    return weights * graph.valid


def top_budget(
    graph: Graph, budget: int, absolute: bool = True, prune: bool = True, weights: Tensor | None = None
) -> Graph:
    """The best-ranked edges whose count by `weights` (default `mib_edge_weights`) stays within `budget`,
    ranked per unit of that count (an ungrouped k/v edge's share of the grouped score); `top_n` when no
    edge counts more than once."""
    weights = mib_edge_weights(graph) if weights is None else weights
    check_size(budget, "budget", int(weights.sum()))
    if int(weights.max()) <= 1:
        return top_n(graph, budget, absolute, prune)
    rank = ranking(graph, graph.scores, absolute) / weights.clamp(min=1)
    return _prefix_within(graph, _order(graph, rank), budget, weights, prune)


def ratio_budget(
    graph: Graph, budget: int, positive: float, prune: bool = True, weights: Tensor | None = None
) -> Graph:
    """Ratio selection (after Nikankin et al. 2025, arXiv 2510.25786): the first `positive` share of the
    budget goes to the edges that help the metric most (signed ranking, helping edges only), the rest to
    the largest |score| among the others; counted by `weights` (default `mib_edge_weights`).
    `positive=1` is signed selection, `positive=0` absolute selection."""
    if not 0 <= positive <= 1:
        raise InputError(f"positive must lie in [0, 1], got {positive!r}")
    weights = mib_edge_weights(graph) if weights is None else weights
    check_size(budget, "budget", int(weights.sum()))
    per_unit = weights.clamp(min=1)
    helping = ranking(graph, graph.scores, absolute=False) / per_unit
    first = _order(graph, helping.masked_fill(helping <= 0, float("-inf")))
    first = first[helping.flatten()[first] > 0]
    taken = _within(weights, first, int(positive * budget))
    rest = _order(graph, ranking(graph, graph.scores, absolute=True) / per_unit)
    rest = rest[~torch.isin(rest, taken)]
    order = torch.cat([taken, rest])
    return _prefix_within(graph, order, budget, weights, prune)


def filled_budget(graph: Graph, budget: int, absolute: bool = True, weights: Tensor | None = None) -> Graph:
    """Pruning-aware selection: the longest prefix of the ranking whose pruned circuit stays within
    `budget` (counted by `weights`, default `mib_edge_weights`), so that edges pruning removes (cut off
    from the input or the logits) do not use up the budget. The pruned size grows with the prefix but
    not always strictly, so a binary search finds a longest prefix up to such steps."""
    weights = mib_edge_weights(graph) if weights is None else weights
    check_size(budget, "budget", int(weights.sum()))
    order = _order(graph, ranking(graph, graph.scores, absolute) / weights.clamp(min=1))
    order = order[graph.valid.flatten()[order]]

    def circuit(k: int) -> Graph:
        chosen = torch.zeros(graph.valid.numel(), dtype=torch.bool)
        chosen[order[:k]] = True
        return with_edges(graph, chosen.reshape(graph.valid.shape), prune=True)

    low = int(_within(weights, order, budget).numel())  # the plain prefix: its pruned size fits
    high = order.numel()
    while low < high:
        k = (low + high + 1) // 2
        if int(weights[circuit(k).in_graph].sum()) <= budget:
            low = k
        else:
            high = k - 1
    return circuit(low)


def _order(graph: Graph, rank: Tensor) -> Tensor:
    """Flat indices of the valid edges, best-ranked first (ties in index order)."""
    flat = rank.masked_fill(~graph.valid, float("-inf")).flatten()
    order = flat.argsort(descending=True, stable=True)
    return order[: int(graph.valid.sum())]


def _within(weights: Tensor, order: Tensor, budget: int) -> Tensor:
    """The longest prefix of `order` whose weights sum to at most `budget`."""
    return order[: int((weights.flatten()[order].cumsum(0) <= budget).sum())]


def _prefix_within(graph: Graph, order: Tensor, budget: int, weights: Tensor, prune: bool) -> Graph:
    chosen = torch.zeros(graph.valid.numel(), dtype=torch.bool)
    chosen[_within(weights, order, budget)] = True
    return with_edges(graph, chosen.reshape(graph.valid.shape), prune)


def ratio_selection(positive: float) -> Selector:
    """The `ratio` strategy with `positive` of the budget for helping edges (`ratio_budget`); it ranks the
    same way for signed and absolute curves."""
    if not 0 <= positive <= 1:
        raise InputError(f"positive must lie in [0, 1], got {positive!r}")

    def select_ratio(graph: Graph, budget: int, _absolute: bool, _seed: int, weights: Tensor) -> Graph:
        return ratio_budget(graph, budget, positive, weights=weights)

    select_ratio.__name__ = f"ratio({positive:g})"
    return select_ratio


def _top(graph: Graph, budget: int, absolute: bool, _seed: int, weights: Tensor) -> Graph:
    return top_budget(graph, budget, absolute, weights=weights)


def _filled(graph: Graph, budget: int, absolute: bool, _seed: int, weights: Tensor) -> Graph:
    return filled_budget(graph, budget, absolute, weights=weights)


def _greedy(graph: Graph, budget: int, absolute: bool, _seed: int, weights: Tensor) -> Graph:
    if int(weights.max()) > 1:
        raise InputError(
            "greedy selection counts every edge once; MIB's budgets count a GQA model's k/v edges once per "
            "query head: use another strategy or protocol='pruned'"
        )
    return graph.greedy(budget, absolute)


def _random(graph: Graph, budget: int, _absolute: bool, seed: int, weights: Tensor) -> Graph:
    """Edges ranked by random scores: a baseline."""
    shuffled = graph.copy()
    shuffled.scores = torch.rand(graph.valid.shape, generator=torch.Generator().manual_seed(seed))
    return top_budget(shuffled, budget, absolute=False, weights=weights)


def _nodes(graph: Graph, budget: int, absolute: bool, _seed: int, weights: Tensor) -> Graph:
    """The largest set of best-ranked nodes (by `graph.node_scores`) whose pruned circuit fits the budget
    (edges grow with the number of nodes: a binary search)."""
    if int(weights[graph.top_nodes(0, absolute).in_graph].sum()) > budget:  # even input -> logits is over
        return with_edges(graph, torch.zeros_like(graph.valid), prune=True)
    low, high = 0, graph.n_sources - 1
    while low < high:
        k = (low + high + 1) // 2
        if int(weights[graph.top_nodes(k, absolute).in_graph].sum()) <= budget:
            low = k
        else:
            high = k - 1
    return graph.top_nodes(low, absolute)


SELECTIONS: dict[str, Selector] = {
    "top_n": _top,
    "filled": _filled,
    "greedy": _greedy,
    "nodes": _nodes,
    "random": _random,
}


def select(
    graph: Graph,
    budget: int,
    selection: Selection | Selector = "top_n",
    absolute: bool = True,
    seed: int = 0,
    weights: Tensor | None = None,
) -> Graph:
    """A pruned circuit within `budget` chosen by `selection` (a name in `SELECTIONS` or a `Selector`),
    counted by `weights` (default: each edge of the graph once)."""
    if isinstance(selection, str):
        if selection not in SELECTIONS:
            names = ", ".join([*SELECTIONS, "ratio (ratio_selection)"])
            raise InputError(f"unknown selection {selection!r}; choose one of {names}")
        selection = SELECTIONS[selection]
    weights = graph.valid.long() if weights is None else weights
    check_size(budget, "budget", int(weights.sum()))
    return selection(graph, budget, absolute, seed, weights)


def selection_name(selection: Selection | Selector) -> str:
    return selection if isinstance(selection, str) else getattr(selection, "__name__", "custom")


Combine = Literal["mean", "min", "max"]


def ensemble_scores(graphs: Sequence[Graph], how: Combine = "mean") -> Graph:
    """A parallel score ensemble (after Mondorf et al. 2025, arXiv 2510.06811): a copy of the first graph
    whose scores combine every graph's, each first divided by its largest |score| so that methods of
    different scales weigh alike; `how` = mean, min or max per edge (min / max of signed scores: the most
    helpful / most hurtful estimate)."""
    if not graphs:
        raise InputError("an ensemble needs at least one scored graph")
    if how not in ("mean", "min", "max"):
        raise InputError(f"how must be mean, min or max, got {how!r}")
    first = graphs[0]
    for other in graphs[1:]:
        if other.valid.shape != first.valid.shape or other.spec != first.spec:
            raise InputError("ensemble graphs must be of the same model")
    scaled = []
    for g in graphs:
        peak = float(g.scores[g.valid].abs().max()) if bool(g.valid.any()) else 0.0
        if peak == 0:
            raise InputError("a graph of the ensemble has no non-zero score: score it first (attribute)")
        scaled.append(g.scores / peak)
    stacked = torch.stack(scaled)
    combined = stacked.mean(0) if how == "mean" else (stacked.amin(0) if how == "min" else stacked.amax(0))
    out = first.copy()
    out.scores = combined * first.valid
    out.node_scores = None
    return out
