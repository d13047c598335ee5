"""A drawing of a position-aware circuit (`SpanGraph`): one column per span, with one example's tokens
under it, one row per layer (input at the bottom, logits on top).

A node is a site at a span. Span edges run inside their span's column, from a source to the nodes that
read the destination there (a key / value input: every query head of its group); crossing edges arc from
a head's column at the key / value span to its column at the query span. Colours, widths and line styles
follow `drawing.draw_circuit`: blue helps the metric (score < 0), red hurts it; q solid, k dashed, v
dotted. Only the `max_edges` edges of largest |score| are drawn, and only the nodes they touch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from circuits.graph import Graph
from circuits.pictures.drawing import HELPS, HURTS, LINESTYLE, MAX_EDGES, legend
from circuits.pictures.viewer import SHOWN, html_of
from circuits.span_graph import LETTERS, SpanGraph

Node = tuple[str, int]  # (source name or "logits", span)


def draw_span_circuit(
    circuit: SpanGraph,
    path: str | Path,
    *,
    tokens: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    max_edges: int | None = MAX_EDGES,
) -> Path:
    """Draw the circuit's span and crossing edges to an SVG / PNG / PDF file (by `path`'s suffix).

    Args:
        tokens: one example's tokens in each span, shown under the span's column.
        max_edges: draw only this many edges, those of largest |score| (None: every edge).
    """
    if Path(path).suffix == ".html":
        return write_span_page(circuit, path, tokens=tokens, title=title)
    path, graph = Path(path), circuit.graph
    edges = _edges(circuit)
    total = len(edges)
    edges = edges if max_edges is None else edges[:max_edges]
    nodes = sorted({node for _, source, targets, _, _ in edges for node in (source, *targets)}, key=str)
    rows = _rows(graph, nodes)
    positions = _positions(graph, nodes, rows)
    fig = Figure(
        figsize=(
            max(7.0, 1.6 * len(circuit.names) + 2.5),
            max(4.5, 0.6 * (max(rows.values(), default=0) + 2)),
        )
    )
    ax = fig.subplots()
    top = max((abs(score) for score, *_ in edges), default=1.0) or 1.0
    for score, source, targets, letter, _ in edges:
        weight = abs(score) / top
        for target in targets:
            crossing = source[1] != target[1]
            (x0, y0), (x1, y1) = positions[source], positions[target]
            ax.annotate(
                "",
                xy=(x1, y1 - (0 if crossing else 0.15)),
                xytext=(x0, y0 + (0 if crossing else 0.15)),
                arrowprops={
                    "arrowstyle": "-|>",
                    "color": HELPS if score < 0 else HURTS,
                    "alpha": 0.3 + 0.7 * weight,
                    "linewidth": 0.5 + 3.0 * weight,
                    "linestyle": LINESTYLE.get(letter or "", "-"),
                    "connectionstyle": f"arc3,rad={-0.35 if crossing else 0.05}",
                    "shrinkA": 6,
                    "shrinkB": 6,
                },
            )
    for (name, _), (x, y) in positions.items():
        kind = "logits" if name == "logits" else graph.node_kind(name)
        shape = "s" if kind == "mlp" else ("D" if kind in ("input", "logits") else "o")
        ax.scatter([x], [y], marker=shape, s=260, color="#f4f1e8", edgecolors="#333333", zorder=3)
        label = name.split(".")[-1] if kind == "head" else name
        ax.text(x, y, label, ha="center", va="center", fontsize=6, zorder=4)
    for s, span in enumerate(circuit.names):
        words = "" if tokens is None else "".join(tokens[s]).strip()
        ax.text(
            s * _COLUMN,
            -1.0,
            f"{span}\n{words[:18]!r}" if tokens is not None else span,
            ha="center",
            va="top",
            fontsize=7,
        )
    for layer, y in rows.items():
        if 0 <= layer < graph.spec.n_layers:
            ax.text(-0.8 * _COLUMN, y, f"layer {layer}", ha="right", va="center", fontsize=7, color="#666666")
    ax.set_xlim(-1.2 * _COLUMN, (len(circuit.names) - 0.5) * _COLUMN)  # every span's column, drawn or not
    ax.set_ylim(-1.8, max(rows.values(), default=0) + 0.6)
    arcs = Line2D([], [], color="#555555", label="arcs: crossing edges, key / value span -> query span")
    ax.legend(
        handles=[*legend(), arcs], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False
    )
    ax.set_axis_off()
    shown = (
        f"{len(edges)} of {total} span and crossing edges, by |score|"
        if len(edges) < total
        else f"{total} edges"
    )
    ax.set_title(f"{title or graph.spec.name}: {shown}", fontsize=10)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def write_span_page(
    circuit: SpanGraph,
    path: str | Path,
    *,
    tokens: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    faithfulness: float | None = None,
) -> Path:
    """The interactive page (`circuits.pictures.viewer`) of a position-aware circuit: every span and
    crossing edge of the circuit, largest |score| first behind the slider, nodes `site@span` laid out in a
    column per span, with the span names (and `tokens`, one example's per span) under the columns."""
    path, graph = Path(path), circuit.graph
    edges = _edges(circuit)
    nodes = sorted({node for _, source, targets, _, _ in edges for node in (source, *targets)}, key=str)
    rows = _rows(graph, nodes)
    cells: dict[tuple[int, int], list[Node]] = {}
    for node in nodes:
        cells.setdefault((node[1], _layer(graph, node[0])), []).append(node)
    widths = [
        max([len(m) for (span, _), m in cells.items() if span == s] or [1]) for s in range(len(circuit.names))
    ]
    starts = [sum(widths[:s]) + s for s in range(len(widths))]  # a free slot between columns
    place: dict[Node, tuple[float, float]] = {}
    for (span, layer), members in cells.items():
        members.sort(key=lambda node: graph.src_index.get(node[0], len(graph.sources)))
        first = starts[span] + (widths[span] - len(members)) / 2
        for i, node in enumerate(members):
            place[node] = (first + i, float(rows[layer]))
    name = {node: f"{node[0]}@{circuit.names[node[1]]}" for node in nodes}
    data = {
        "title": title or graph.spec.name or "circuit",
        "model": graph.spec.name,
        "n_in_graph": circuit.n_in_graph,
        "n_edges": circuit.n_edges,
        "shown": min(SHOWN, len(edges)),
        "faithfulness": faithfulness,
        "prompts": [],
        "nodes": [
            {
                "id": name[node],
                "label": node[0].split(".")[-1],
                "kind": "logits" if node[0] == "logits" else graph.node_kind(node[0]),
                "layer": None if node[0] in ("input", "logits") else graph.node_layer(node[0]),
                "x": place[node][0],
                "y": place[node][1],
                "score": None,
            }
            for node in nodes
        ],
        "edges": [
            {
                "name": edge_name,
                "source": name[source],
                "targets": [name[t] for t in targets],
                "input": letter,
                "score": score,
            }
            for score, source, targets, letter, edge_name in edges
        ],
        "columns": [
            {
                "x": starts[s] + (widths[s] - 1) / 2,
                "label": span,
                "text": "" if tokens is None else "".join(tokens[s]).strip()[:24],
            }
            for s, span in enumerate(circuit.names)
        ],
    }
    path.write_text(html_of(data), encoding="utf-8")
    return path


_COLUMN = 2.0  # horizontal room per span


Edge = tuple[float, Node, list[Node], str | None, str]  # (score, source, nodes it feeds, q/k/v, name)


def _edges(circuit: SpanGraph) -> list[Edge]:
    """The circuit's span and crossing edges, largest |score| first."""
    graph = circuit.graph
    edges: list[Edge] = []
    for s, u, v in (circuit.in_graph & circuit.valid).nonzero().tolist():
        targets = [(name, s) for name in graph.readers(v)]
        letter = graph.qkv_letter(graph.destinations[v])
        name = circuit.edge_name("span", (s, u, v))
        edges.append((float(circuit.scores[s, u, v]), (graph.sources[u], s), targets, letter, name))
    for a, b, h, i in (circuit.in_crossing & circuit.crossing_valid).nonzero().tolist():
        name = circuit.edge_name("crossing", (a, b, h, i))
        score = float(circuit.crossing_scores[a, b, h, i])
        edges.append((score, (graph.sources[h], a), [(graph.sources[h], b)], LETTERS[i], name))
    return sorted(edges, key=lambda edge: -abs(edge[0]))


def _rows(graph: Graph, nodes: list[Node]) -> dict[int, int]:
    """Layer (-1: input, n_layers: logits) -> row, for the layers that hold a drawn node."""
    layers = sorted({_layer(graph, name) for name, _ in nodes})
    return {layer: row for row, layer in enumerate(layers)}


def _layer(graph: Graph, name: str) -> int:
    if name == "logits":
        return graph.spec.n_layers
    layer = graph.node_layer(name)
    return -1 if layer is None else layer


def _positions(graph: Graph, nodes: list[Node], rows: dict[int, int]) -> dict[Node, tuple[float, float]]:
    """Each node's place: its span's column, its layer's row, side by side within a cell in index order."""
    cells: dict[tuple[int, int], list[Node]] = {}
    for node in nodes:
        cells.setdefault((node[1], _layer(graph, node[0])), []).append(node)
    positions = {}
    for (span, layer), members in cells.items():
        members.sort(key=lambda node: graph.src_index.get(node[0], len(graph.sources)))
        step = min(0.4, 1.6 / max(len(members), 1))
        for i, node in enumerate(members):
            positions[node] = (span * _COLUMN + (i - (len(members) - 1) / 2) * step, float(rows[layer]))
    return positions
