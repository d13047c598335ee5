"""Drawings of circuits and faithfulness curves with matplotlib (pure Python: no graphviz build needed).

Circuit layout: one row per layer part that holds a live node (input at the bottom, then each layer's heads
and its MLP, logits on top); heads are placed by index, the MLP at the right. Edges are coloured by score
sign (blue: the edge helps the metric, i.e. negative score; red: it hurts) with width and opacity growing
with |score|; q inputs solid, k dashed, v dotted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from circuits.errors import InputError
from circuits.faithfulness import FaithfulnessCurve
from circuits.graph import Graph
from circuits.selection import destination_owners

HELPS, HURTS = "#1f5fbf", "#c8372d"
LINESTYLE = {"q": "-", "k": "--", "v": ":"}


def _rows(circuit: Graph) -> dict[str, tuple[float, float]]:
    """(x, y) position of every live node and of the logits."""
    spec = circuit.spec
    live = circuit.nodes_in_graph.tolist()
    positions: dict[str, tuple[float, float]] = {}
    y = 0.0
    centre = spec.n_heads / 2
    positions["input"] = (centre, y)
    for layer in range(spec.n_layers):
        first, stop, _ = circuit.head_sources(layer).indices(circuit.n_sources)
        heads = [(h, circuit.sources[i]) for h, i in enumerate(range(first, stop)) if live[i]]
        mlp = live[circuit.mlp_source(layer)]
        if heads or mlp:
            y += 1
        for h, name in heads:
            positions[name] = (float(h) if spec.per_head_sources else centre, y)
        if mlp:
            positions[f"m{layer}"] = (spec.n_heads + 0.5, y)
    positions["logits"] = (centre, y + 1)
    return positions


def draw_circuit(circuit: Graph, path: str | Path, *, title: str | None = None) -> Path:
    """Draw the circuit's edges (`in_graph`) to an SVG / PNG / PDF file chosen by `path`'s suffix."""
    path = Path(path)
    edges = circuit.in_graph & circuit.valid
    if not bool(edges.any()):
        raise InputError("the circuit has no edges to draw")
    positions = _rows(circuit)
    owners = destination_owners(circuit)
    rows, cols = edges.nonzero(as_tuple=True)
    magnitude = circuit.scores[edges].abs()
    top = float(magnitude.max()) or 1.0
    n_rows = max(y for _, y in positions.values()) + 1
    fig = Figure(figsize=(max(6.0, 0.9 * (circuit.spec.n_heads + 2)), max(4.0, 0.8 * n_rows)))
    ax = fig.subplots()
    for r, c in zip(rows.tolist(), cols.tolist()):
        source = circuit.sources[r]
        if source not in positions:
            continue
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
                xy=(x1, y1 - 0.12),
                xytext=(x0, y0 + 0.12),
                arrowprops={
                    "arrowstyle": "-|>",
                    "color": HELPS if score < 0 else HURTS,
                    "alpha": 0.25 + 0.75 * weight,
                    "linewidth": 0.4 + 3.0 * weight,
                    "linestyle": LINESTYLE.get(letter or "", "-"),
                    "connectionstyle": "arc3,rad=0.08",
                    "shrinkA": 0,
                    "shrinkB": 0,
                },
            )
    for name, (x, y) in positions.items():
        kind = circuit.node_kind(name)
        shape = "s" if kind == "mlp" else ("D" if kind in ("input", "logits") else "o")
        ax.scatter([x], [y], marker=shape, s=260, color="#f4f1e8", edgecolors="#333333", zorder=3)
        ax.text(x, y, name, ha="center", va="center", fontsize=6, zorder=4)
    ax.set_axis_off()
    n_edges = int(edges.sum())
    ax.set_title(title or f"{circuit.spec.name or 'circuit'}: {n_edges} edges (blue helps, red hurts)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return path


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
