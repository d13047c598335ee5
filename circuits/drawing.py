"""Drawings of circuits and faithfulness curves with matplotlib (pure Python: no graphviz build needed).

Circuit layout: one row per layer that holds a drawn node (input at the bottom, logits on top, the layer
index at the left); a row's heads sit side by side in index order, centred, with the MLP beside them.
Only the `max_edges` edges of largest |score| are drawn (the title says how many are hidden), and only the
nodes they touch. Edges are coloured by score sign (blue: the edge helps the metric, i.e. a negative
score; red: it hurts), with width and opacity growing with |score|; q inputs solid, k dashed, v dotted;
a legend says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from circuits.errors import InputError
from circuits.faithfulness import FaithfulnessCurve
from circuits.graph import Graph
from circuits.selection import destination_owners

HELPS, HURTS = "#1f5fbf", "#c8372d"
LINESTYLE: dict[str, Literal["-", "--", ":"]] = {"q": "-", "k": "--", "v": ":"}
MAX_EDGES = 60  # drawn by default: enough for the main paths, few enough to follow by eye


def _drawn_edges(circuit: Graph, max_edges: int | None) -> Tensor:
    """bool [n_sources, n_destinations]: the circuit's edges of largest |score|, at most `max_edges`."""
    if max_edges is not None and (
        isinstance(max_edges, bool) or not isinstance(max_edges, int) or max_edges < 1
    ):
        raise InputError(f"max_edges must be a whole number >= 1 (or None for all), got {max_edges!r}")
    edges = circuit.in_graph & circuit.valid
    if max_edges is None or int(edges.sum()) <= max_edges:
        return edges
    magnitude = torch.where(edges, circuit.scores.abs(), torch.full_like(circuit.scores, -1.0))
    keep = torch.zeros_like(edges)
    keep.view(-1)[magnitude.view(-1).topk(max_edges).indices] = True
    return keep & edges


def _layout(circuit: Graph, edges: Tensor, owners: Tensor) -> dict[str, tuple[float, float]]:
    """(x, y) of every node the drawn edges touch, plus input and logits."""
    touched = edges.amax(1) | (owners.float().T @ edges.amax(0).float().unsqueeze(1)).squeeze(1).bool()
    positions: dict[str, tuple[float, float]] = {"input": (0.0, 0.0)}
    y = 0.0
    for layer in range(circuit.spec.n_layers):
        row = [
            circuit.sources[i] for i in range(circuit.n_sources)[circuit.head_sources(layer)] if touched[i]
        ]
        if touched[circuit.mlp_source(layer)]:
            row.append(f"m{layer}")
        if not row:
            continue
        y += 1
        for k, name in enumerate(row):
            positions[name] = (k - (len(row) - 1) / 2, y)
    positions["logits"] = (0.0, y + 1)
    return positions


def draw_circuit(
    circuit: Graph, path: str | Path, *, title: str | None = None, max_edges: int | None = MAX_EDGES
) -> Path:
    """Draw the circuit's edges (`in_graph`) to an SVG / PNG / PDF file chosen by `path`'s suffix.

    Args:
        max_edges: draw only this many edges, those of largest |score| (None: every edge).
    """
    path = Path(path)
    if not bool((circuit.in_graph & circuit.valid).any()):
        raise InputError("the circuit has no edges to draw")
    edges = _drawn_edges(circuit, max_edges)
    owners = destination_owners(circuit)
    positions = _layout(circuit, edges, owners)
    top = float(circuit.scores[edges].abs().max()) or 1.0
    n_rows = max(y for _, y in positions.values()) + 1
    width = max(x for x, _ in positions.values()) - min(x for x, _ in positions.values()) + 1
    fig = Figure(figsize=(max(7.0, 1.1 * width + 2.5), max(4.5, 0.75 * n_rows + 1.5)))
    ax = fig.subplots()
    rows, cols = edges.nonzero(as_tuple=True)
    for r, c in zip(rows.tolist(), cols.tolist()):
        source = circuit.sources[r]
        letter = Graph.qkv_letter(circuit.destinations[c])
        targets = (
            [circuit.sources[o] for o in owners[c].nonzero()[:, 0].tolist()]
            if c != circuit.logits_destination
            else ["logits"]
        )
        score = float(circuit.scores[r, c])
        weight = abs(score) / top
        for target in (t for t in targets if t in positions):
            (x0, y0), (x1, y1) = positions[source], positions[target]
            ax.annotate(
                "",
                xy=(x1, y1 - 0.18),
                xytext=(x0, y0 + 0.18),
                arrowprops={
                    "arrowstyle": "-|>",
                    "color": HELPS if score < 0 else HURTS,
                    "alpha": 0.3 + 0.7 * weight,
                    "linewidth": 0.5 + 3.5 * weight,
                    "linestyle": LINESTYLE.get(letter or "", "-"),
                    "connectionstyle": "arc3,rad=0.06",
                    "shrinkA": 0,
                    "shrinkB": 0,
                },
            )
    for name, (x, y) in positions.items():
        kind = circuit.node_kind(name)
        shape = "s" if kind == "mlp" else ("D" if kind in ("input", "logits") else "o")
        ax.scatter([x], [y], marker=shape, s=900, color="#f4f1e8", edgecolors="#333333", zorder=3)
        ax.text(x, y, name, ha="center", va="center", fontsize=8, zorder=4)
    left = min(x for x, _ in positions.values()) - 1.2
    rows_by_layer = {circuit.node_layer(name): y for name, (_, y) in positions.items()}
    for layer, y in rows_by_layer.items():
        if layer is not None:
            ax.text(left, y, f"layer {layer}", ha="right", va="center", fontsize=8, color="#666666")
    ax.legend(handles=_legend(), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_axis_off()
    shown, total = int(edges.sum()), circuit.n_in_graph
    hidden = f"{shown} of {total} edges shown, by |score|" if shown < total else f"{total} edges"
    ax.set_title(f"{title or circuit.spec.name or 'circuit'}: {hidden}", fontsize=10)
    fig.savefig(path, dpi=150, bbox_inches="tight")  # the canvas grows to hold the legend
    return path


def _legend() -> list[Line2D]:
    return [
        Line2D([], [], color=HELPS, linewidth=2, label="helps the metric (score < 0)"),
        Line2D([], [], color=HURTS, linewidth=2, label="hurts it (score > 0)"),
        Line2D([], [], color="#555555", linewidth=3.5, label="width, opacity: |score|"),
        *(
            Line2D([], [], color="#555555", linestyle=style, label=f"into {letter} input")
            for letter, style in LINESTYLE.items()
        ),
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor="#f4f1e8",
            markeredgecolor="#333333",
            label="head",
        ),
        Line2D(
            [],
            [],
            marker="s",
            linestyle="",
            markerfacecolor="#f4f1e8",
            markeredgecolor="#333333",
            label="MLP",
        ),
    ]


def plot_curves(
    curves: Sequence[FaithfulnessCurve], path: str | Path, *, title: str = "Faithfulness"
) -> Path:
    """Faithfulness against the fraction of edges kept (log scale), one line per curve."""
    path = Path(path)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for curve in curves:
        x = [p.fraction * 100 for p in curve.points]
        y = [p.faithfulness for p in curve.points]
        kind = (
            f"|score|, CMD {curve.area_from_one:.3f}"
            if curve.absolute
            else f"signed, CPR {curve.area_under:.3f}"
        )
        ax.plot(x, y, marker="o", markersize=3, label=f"{curve.label} ({kind})")
    ax.axhline(1.0, color="#888888", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (% of the graph, after pruning)")
    ax.set_ylabel("faithfulness f = (M(C) - M(empty)) / (M(full) - M(empty))")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return path
