"""From scores to circuits.

pruning      top-n, threshold, greedy and node-level selection, and pruning dead edges
strategies   selection strategies for faithfulness curves (filled, ratio, ensembles, random, ...)
"""

from circuits.selection.pruning import (
    check_size,
    destination_owners,
    destinations_of_sources,
    greedy,
    nodes_touched,
    prune_dead,
    ranking,
    threshold,
    top_n,
    top_nodes,
    with_edges,
)

__all__ = [
    "check_size",
    "destination_owners",
    "destinations_of_sources",
    "greedy",
    "nodes_touched",
    "prune_dead",
    "ranking",
    "threshold",
    "top_n",
    "top_nodes",
    "with_edges",
]
