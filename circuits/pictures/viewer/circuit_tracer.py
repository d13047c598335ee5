"""A circuit as the graph file circuit-tracer's frontend and Neuronpedia's graph viewer read
(`metadata`, `qParams`, `nodes`, `links`; circuit-tracer's `frontend/graph_models.py`), and back.

What maps to what (our circuits have no token positions: every node sits at ctx_idx 0):

- input: feature_type "embedding", layer "E", node_id "E_0_0";
- head a{l}.h{h} (a layer's one attention node a{l}: h = 0): feature_type "cross layer transcoder",
  layer "l", feature h, node_id "l_h_0";
- MLP m{l}: "cross layer transcoder", layer "l", feature n_heads, node_id "l_{n_heads}_0";
- logits: feature_type "logit", layer "n_layers + 1", is_target_logit true.

`clerp` (the frontend's label) holds our node name; `influence` its node score when the graph has node
scores. One link per (source node, target node) pair of the circuit's edges: `weight` = -(sum of the
scores of the edges it stands for), so positive means the edge helps the metric (our scores estimate
M(edge ablated) - M(clean)); edges into several inputs of one head (q, k, v) add up there, and a k / v
edge of a key-value group appears on the link to every head of the group. Each link also carries
`circuits_edges` ({edge name: score}) and the metadata carries `circuits_cfg` (our graph's cfg), fields
the frontend ignores, so that `from_circuit_tracer` rebuilds the circuit exactly (edges outside the
circuit are not in the file and read back with score 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from circuits.errors import FileFormatError
from circuits.graph import Graph
from circuits.pictures.layout import largest_edges, shown_edges
from circuits.textfiles import read_text


def _node(circuit: Graph, name: str) -> dict[str, Any]:
    spec = circuit.spec
    kind, layer = circuit.node_kind(name), circuit.node_layer(name)
    if kind == "input":
        row, feature, node_id, js_id, feature_type = "E", 0, "E_0_0", "E_0-0", "embedding"
    elif kind == "logits":
        row, feature, feature_type = str(spec.n_layers + 1), 0, "logit"
        node_id, js_id = f"{row}_0_0", "L_0-0"
    else:
        row = str(layer)
        feature = spec.n_heads if kind == "mlp" else circuit.node_head(name) or 0
        node_id, js_id, feature_type = f"{row}_{feature}_0", f"{row}_{feature}-0", "cross layer transcoder"
    score = None
    if circuit.node_scores is not None and name in circuit.src_index:
        score = float(circuit.node_scores[circuit.src_index[name]])
    return {
        "node_id": node_id,
        "feature": feature,
        "layer": row,
        "ctx_idx": 0,
        "feature_type": feature_type,
        "token_prob": 0.0,
        "is_target_logit": kind == "logits",
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js_id,
        "clerp": name,
        "influence": score,
        "activation": None,
    }


def circuit_tracer_graph(circuit: Graph, *, slug: str = "circuit", prompt: str = "") -> dict[str, Any]:
    """The circuit's edges (`in_graph`) as a circuit-tracer graph (see the module docstring)."""
    edges = shown_edges(circuit, largest_edges(circuit, None))
    names = {"input", "logits"} | {e.source for e in edges} | {t for e in edges for t in e.targets}
    order = [name for name in circuit.sources if name in names] + ["logits"]  # input first
    nodes = {name: _node(circuit, name) for name in order}
    links: dict[tuple[str, str], dict[str, float]] = {}
    for edge in edges:
        for target in edge.targets:
            links.setdefault((edge.source, target), {})[edge.name] = edge.score
    return {
        "metadata": {
            "slug": slug,
            "scan": circuit.spec.name,
            "transcoder_list": [],
            "prompt_tokens": [],
            "prompt": prompt,
            "node_threshold": None,
            "schema_version": 1,
            "circuits_cfg": circuit.cfg(),
            "circuits_nodes": [
                n for n, kept in zip(circuit.sources, circuit.nodes_in_graph.tolist()) if kept
            ],
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": list(nodes.values()),
        "links": [
            {
                "source": nodes[source]["node_id"],
                "target": nodes[target]["node_id"],
                "weight": -sum(scores.values()),
                "circuits_edges": scores,
            }
            for (source, target), scores in links.items()
        ],
    }


def to_circuit_tracer(circuit: Graph, path: str | Path, *, slug: str = "circuit", prompt: str = "") -> Path:
    """Write `circuit_tracer_graph(circuit)` to `path` (.json)."""
    path = Path(path)
    path.write_text(json.dumps(circuit_tracer_graph(circuit, slug=slug, prompt=prompt)))
    return path


def from_circuit_tracer(path: str | Path) -> Graph:
    """Read a file written by `to_circuit_tracer` back into a circuit (its edges, scores, node scores)."""
    where = str(path)
    try:
        data = json.loads(read_text(Path(path), "circuit-tracer graph file"))
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{where}: cannot read a circuit-tracer graph file: {err}") from None
    if not isinstance(data, dict) or not {"metadata", "nodes", "links"} <= set(data):
        raise FileFormatError(f"{where}: a circuit-tracer graph file holds metadata, nodes and links")
    for key in ("nodes", "links"):
        if not isinstance(data[key], list):
            raise FileFormatError(f"{where}: {key} must be a list, got {type(data[key]).__name__}")
    cfg = data["metadata"].get("circuits_cfg") if isinstance(data["metadata"], dict) else None
    if cfg is None:
        raise FileFormatError(
            f"{where}: metadata.circuits_cfg is missing: only graphs this toolkit wrote can be read back "
            "(a circuit-tracer attribution graph of transcoder features is not a head / MLP circuit)"
        )
    nodes: dict[str, dict[str, Any]] = {"logits": {"in_graph": True}}
    for k, node in enumerate(data["nodes"]):
        if not isinstance(node, dict) or not isinstance(node.get("clerp"), str):
            raise FileFormatError(f"{where}: nodes[{k}].clerp: expected the node's name")
        if node["clerp"] not in ("input", "logits"):
            nodes[node["clerp"]] = {"in_graph": True, "score": node.get("influence")}
    edges: dict[str, dict[str, Any]] = {}
    for k, link in enumerate(data["links"]):
        scores = link.get("circuits_edges") if isinstance(link, dict) else None
        if not isinstance(scores, dict):
            raise FileFormatError(f"{where}: links[{k}].circuits_edges: expected {{edge name: score}}")
        edges.update({name: {"score": score, "in_graph": True} for name, score in scores.items()})
    graph = Graph.from_dict({"cfg": cfg, "nodes": nodes, "edges": edges}, where)
    # the circuit's nodes as written (metadata.circuits_nodes), else those the file lists
    kept = data["metadata"].get("circuits_nodes")
    if not isinstance(kept, list) or not all(isinstance(n, str) for n in kept):
        kept = [*nodes, "input"]
    graph.nodes_in_graph = torch.tensor([name in kept for name in graph.sources])
    return graph
