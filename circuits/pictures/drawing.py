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

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from circuits.evaluation.curves import FaithfulnessCurve
from circuits.graph import Graph
from circuits.pictures.layout import largest_edges, layer_layout, shown_edges
from circuits.pictures.viewer import write_page

HELPS, HURTS = "#1f5fbf", "#c8372d"
LINESTYLE: dict[str, Literal["-", "--", ":"]] = {"q": "-", "k": "--", "v": ":"}
MAX_EDGES = 60  # drawn by default: enough for the main paths, few enough to follow by eye


def draw_circuit(
    circuit: Graph, path: str | Path, *, title: str | None = None, max_edges: int | None = MAX_EDGES
) -> Path:
    """Draw the circuit's edges (`in_graph`) to an SVG / PNG / PDF file chosen by `path`'s suffix, or
    to the interactive page (`circuits.pictures.viewer`) for `.html`.

    Args:
        max_edges: draw only this many edges, those of largest |score| (None: every edge); the page
            holds every edge and shows `circuits.pictures.viewer.SHOWN` at first, behind a slider.
    """
    path = Path(path)
    if path.suffix == ".html":
        return write_page(circuit, path, title=title)
    edges = shown_edges(circuit, largest_edges(circuit, max_edges))
    positions = layer_layout(circuit, edges)
    top = max(abs(e.score) for e in edges) or 1.0
    n_rows = max(y for _, y in positions.values()) + 1
    width = max(x for x, _ in positions.values()) - min(x for x, _ in positions.values()) + 1
    fig = Figure(figsize=(max(7.0, 1.1 * width + 2.5), max(4.5, 0.75 * n_rows + 1.5)))
    ax = fig.subplots()
    for edge in edges:
        weight = abs(edge.score) / top
        for target in edge.targets:
            (x0, y0), (x1, y1) = positions[edge.source], positions[target]
            ax.annotate(
                "",
                xy=(x1, y1 - 0.18),
                xytext=(x0, y0 + 0.18),
                arrowprops={
                    "arrowstyle": "-|>",
                    "color": HELPS if edge.score < 0 else HURTS,
                    "alpha": 0.3 + 0.7 * weight,
                    "linewidth": 0.5 + 3.5 * weight,
                    "linestyle": LINESTYLE.get(edge.letter or "", "-"),
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
    ax.legend(handles=legend(), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_axis_off()
    shown, total = len(edges), circuit.n_in_graph
    hidden = f"{shown} of {total} edges shown, by |score|" if shown < total else f"{total} edges"
    ax.set_title(f"{title or circuit.spec.name or 'circuit'}: {hidden}", fontsize=10)
    fig.savefig(path, dpi=150, bbox_inches="tight")  # the canvas grows to hold the legend
    return path


def legend() -> list[Line2D]:
    """The legend of circuit drawings: colours, widths, line styles and node shapes."""
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
