"""The interactive circuit page: one self-contained HTML file (styles, script and data inlined; it
fetches nothing, so it opens offline, from a mail attachment or inside a notebook).

The page lays the circuit out by layer (`circuits.pictures.layout`), colours edges by sign and sizes them by
|score|, draws q / k / v inputs solid / dashed / dotted, and offers: a slider for how many edges are shown
(largest |score| first), hover cards with names and scores, a click on a node to highlight every shown
path through it from the input to the logits, a side panel of the top nodes and edges, and a search box
for node names. Node scores, the circuit's faithfulness and the task's prompts are shown when given.

    write_page(circuit, "circuit.html")      # also draw_circuit(circuit, "circuit.html")
    show(circuit)                            # inline in Jupyter
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from circuits.graph import Graph
from circuits.pictures.layout import largest_edges, layer_layout, shown_edges

SHOWN = 60  # edges shown when the page opens; the slider reaches every edge of the circuit


def page_data(
    circuit: Graph,
    *,
    title: str | None = None,
    faithfulness: float | None = None,
    prompts: Sequence[str] = (),
) -> dict[str, Any]:
    """What the page's script reads: nodes with positions (and scores when the graph has them), the
    circuit's edges largest |score| first, and the optional extras."""
    edges = shown_edges(circuit, largest_edges(circuit, None))
    positions = layer_layout(circuit, edges)
    nodes: list[dict[str, Any]] = []
    for name, (x, y) in positions.items():
        score = None
        if circuit.node_scores is not None and name in circuit.src_index:
            value = float(circuit.node_scores[circuit.src_index[name]])
            score = value if math.isfinite(value) else None  # a node a file gave no score (JSON has no NaN)
        kind, layer = circuit.node_kind(name), circuit.node_layer(name)
        nodes.append({"id": name, "kind": kind, "layer": layer, "x": x, "y": y, "score": score})
    return {
        "title": title or circuit.spec.name or "circuit",
        "model": circuit.spec.name,
        "n_in_graph": circuit.n_in_graph,
        "n_edges": circuit.n_edges,
        "shown": min(SHOWN, len(edges)),
        "faithfulness": faithfulness,
        "prompts": list(prompts),
        "nodes": nodes,
        "edges": [
            {
                "name": e.name,
                "source": e.source,
                "targets": list(e.targets),
                "input": e.letter,
                "score": e.score,
            }
            for e in edges
        ],
    }


def page_html(circuit: Graph, **extras: Any) -> str:
    """The page as one HTML string (see `page_data` for the extras: title, faithfulness, prompts)."""
    return html_of(page_data(circuit, **extras))


def html_of(data: dict[str, Any]) -> str:
    """The page of a `page_data`-shaped dict (nodes may add a short `label`; `columns`, when given, label
    the x axis: [{"x", "label", "text"}], e.g. a position-aware circuit's spans)."""
    assets = resources.files("circuits.pictures.viewer")
    script = assets.joinpath("viewer.js").read_text()
    style = assets.joinpath("viewer.css").read_text()
    # "<", ">" and "&" as JSON escapes: no "</script>" or "<!--" in the data block can end or hide it
    payload = json.dumps(data, allow_nan=False)
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(data['title'])}</title><style>{style}</style></head><body>"
        f"<script type='application/json' id='circuit-data'>{payload}</script>"
        f"<script>{script}</script></body></html>\n"
    )


def write_page(circuit: Graph, path: str | Path, **extras: Any) -> Path:
    """Write the interactive page to `path` (.html); extras as `page_data`."""
    path = Path(path)
    path.write_text(page_html(circuit, **extras), encoding="utf-8")
    return path


class CircuitView:
    """The page, displayed inline by Jupyter (in an iframe, so its styles and ids stay its own)."""

    def __init__(self, circuit: Graph, height: int = 640, **extras: Any) -> None:
        self.page = page_html(circuit, **extras)
        self.height = height

    def _repr_html_(self) -> str:
        return (
            f'<iframe srcdoc="{html.escape(self.page, quote=True)}" style=\'width: 100%; '
            f"height: {self.height}px; border: 1px solid #ddd' sandbox='allow-scripts'></iframe>"
        )


def show(circuit: Graph, height: int = 640, **extras: Any) -> CircuitView:
    """The interactive page of `circuit` for a notebook cell: `show(circuit)` as its last line."""
    return CircuitView(circuit, height, **extras)
