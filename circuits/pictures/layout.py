"""What a picture of a circuit shows: its edges as (source, target nodes, input letter, score), and where
each node goes. Shared by the static drawing (`circuits.pictures.drawing`) and the interactive page
(`circuits.pictures.viewer`).

Layout: one row per layer that holds a shown node (input at the bottom, logits on top); a row's heads sit
side by side in index order, centred, with the MLP beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.errors import InputError
from circuits.graph import Graph
from circuits.selection import destination_owners


@dataclass(frozen=True)
class ShownEdge:
    """One edge as drawn: into `letter`'s input (q, k, v; None for an MLP or the logits) of `targets`
    (every head of a key-value group reads its k / v input)."""

    name: str
    source: str
    targets: tuple[str, ...]
    letter: str | None
    score: float


def largest_edges(circuit: Graph, max_edges: int | None) -> Tensor:
    """bool [n_sources, n_destinations]: the circuit's edges of largest |score|, at most `max_edges`."""
    if max_edges is not None and (
        isinstance(max_edges, bool) or not isinstance(max_edges, int) or max_edges < 1
    ):
        raise InputError(f"max_edges must be a whole number >= 1 (or None for all), got {max_edges!r}")
    edges = circuit.in_graph & circuit.valid
    if not bool(edges.any()):
        raise InputError("the circuit has no edges to show")
    if max_edges is None or int(edges.sum()) <= max_edges:
        return edges
    magnitude = torch.where(edges, circuit.scores.abs(), torch.full_like(circuit.scores, -1.0))
    keep = torch.zeros_like(edges)
    keep.view(-1)[magnitude.view(-1).topk(max_edges).indices] = True
    return keep & edges


def shown_edges(circuit: Graph, edges: Tensor) -> list[ShownEdge]:
    """The edges of the mask `edges` [n_sources, n_destinations], largest |score| first."""
    owners = destination_owners(circuit)
    rows, cols = edges.nonzero(as_tuple=True)
    scores = circuit.scores[rows, cols]
    order = scores.abs().argsort(descending=True, stable=True)
    found = []
    for r, c, score in zip(rows[order].tolist(), cols[order].tolist(), scores[order].tolist()):
        destination = circuit.destinations[c]
        targets = (
            ("logits",)
            if c == circuit.logits_destination
            else tuple(circuit.sources[o] for o in owners[c].nonzero()[:, 0].tolist())
        )
        source = circuit.sources[r]
        found.append(
            ShownEdge(f"{source}->{destination}", source, targets, Graph.qkv_letter(destination), score)
        )
    return found


def layer_layout(circuit: Graph, edges: list[ShownEdge]) -> dict[str, tuple[float, float]]:
    """(x, y) of every node the edges touch, plus input and logits; y is the row (input 0)."""
    touched = {e.source for e in edges} | {t for e in edges for t in e.targets}
    positions: dict[str, tuple[float, float]] = {"input": (0.0, 0.0)}
    y = 0.0
    for layer in range(circuit.spec.n_layers):
        heads = range(circuit.n_sources)[circuit.head_sources(layer)]
        row = [circuit.sources[i] for i in heads if circuit.sources[i] in touched]
        if layer in circuit.spec.parallel_mixer_layers and f"mix{layer}" in touched:  # beside the heads
            row.append(f"mix{layer}")
        mlp = circuit.sources[circuit.mlp_source(layer)] if circuit.spec.has_mlp(layer) else None
        if mlp in touched:
            row.append(mlp)
        if not row:
            continue
        y += 1
        for k, name in enumerate(row):
            positions[name] = (k - (len(row) - 1) / 2, y)
    positions["logits"] = (0.0, y + 1)
    return positions
