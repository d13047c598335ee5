"""MIB circuit-track submissions: one folder per task and model (`ioi_gpt2`, `arc-easy_llama3`) holding
either one file of importance scores or nine circuits, one per edge budget (MIB's README, "Submitting to
the MIB Leaderboard"; files in EAP-IG's `.json` / `.pt` formats, `Graph.to_json` / `Graph.to_pt`).

A circuit for budget p holds at most p% of the edges of MIB's graph, in which a grouped-query model's
query heads each have their own k and v inputs: such a model's graph must be the ungrouped one
(`Graph.from_model(model, ungrouped=True)`), whose edge names are MIB's. Importance files carry MIB's sign
(helpful edges positive, as MIB attributes with `loss=True`), stated in the file (`score_sign`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from circuits.errors import FileFormatError, InputError
from circuits.graph import Graph
from circuits.selection.strategies import mib_edge_weights, top_budget

SUBMISSION_PERCENTAGES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
FileKind = Literal["json", "pt"]


def submission_folder(root: str | Path, task: str, model: str) -> Path:
    """`root/{task}_{model}`; MIB splits the name at the underscore, so neither part may hold one."""
    if "_" in task or "_" in model or not task or not model:
        raise InputError(
            f"MIB names a submission folder task_model and splits it at the underscore: task {task!r} and "
            f"model {model!r} must be non-empty and hold none (write arc-easy, not arc_easy)"
        )
    for name, value in (("task", task), ("model", model)):
        if any(c in value for c in "/\\") or value in (".", ".."):
            raise InputError(
                f"{name} {value!r} would make a nested folder, which MIB does not read: give a plain name "
                f"({value.replace('/', '-').replace(chr(92), '-')!r}, or the name MIB uses for the model)"
            )
    return Path(root) / f"{task}_{model}"


def _only_kind(folder: Path, kind: str) -> None:
    """`InputError` when `folder` already holds the other kind of submission (importance scores against
    circuits): MIB reads one file of scores or nine circuits, never both."""
    other = "circuit_*" if kind == "importances" else "importances.*"
    found = sorted(p.name for p in folder.glob(other) if p.suffix in (".json", ".pt"))
    if found:
        raise InputError(
            f"{folder} already holds {', '.join(found)}: a submission folder holds one file of importance "
            "scores or nine circuits, not both. Write into another folder, or remove those files"
        )


def write_importances(graph: Graph, root: str | Path, task: str, model: str, kind: FileKind = "json") -> Path:
    """Write `graph`'s edge scores as the folder's one importance file, in MIB's sign (negated: an edge
    that helps the metric is positive, so MIB's signed curve takes it first); returns its path."""
    _check_mib_graph(graph)
    folder = submission_folder(root, task, model)
    _only_kind(folder, "importances")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"importances.{_check_kind(kind)}"
    graph.to_json(path, sign="loss") if kind == "json" else graph.to_pt(path, sign="loss")
    return path


def write_circuits(
    graph: Graph,
    root: str | Path,
    task: str,
    model: str,
    *,
    absolute: bool = False,
    kind: FileKind = "json",
) -> list[Path]:
    """Write nine circuits of `graph`'s best edges (by signed score, or |score| with `absolute`), one per
    budget in `SUBMISSION_PERCENTAGES`, each pruned and within its budget; returns their paths."""
    _check_mib_graph(graph)
    folder = submission_folder(root, task, model)
    _only_kind(folder, "circuits")
    folder.mkdir(parents=True, exist_ok=True)
    total = int(mib_edge_weights(graph).sum())
    paths = []
    for percent in SUBMISSION_PERCENTAGES:
        circuit = top_budget(graph, int(percent / 100 * total), absolute)
        path = folder / f"circuit_{percent:g}.{_check_kind(kind)}"
        circuit.to_json(path, scores=False) if kind == "json" else circuit.to_pt(path)
        paths.append(path)
    return paths


def read_submission(folder: str | Path) -> Graph | list[Graph]:
    """The importance scores of a submission folder (in this toolkit's sign: files that do not state
    theirs are taken as MIB's, helpful edges positive), or its nine circuits (smallest first), each checked
    against the budget it must stay within; `FileFormatError` names what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileFormatError(f"{folder}: no such submission folder")
    if folder.name.count("_") != 1:
        raise FileFormatError(f"{folder}: a submission folder is named task_model (one underscore)")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".pt"))
    graphs = [Graph.from_json(p, "loss") if p.suffix == ".json" else Graph.from_pt(p, "loss") for p in files]
    if len(graphs) == 1:
        return graphs[0]
    shapes = {(g.spec.n_layers, g.spec.n_heads, g.spec.n_kv_heads, g.n_edges) for g in graphs}
    if len(shapes) > 1:
        raise FileFormatError(
            f"{folder}: its circuit files describe different graphs (layers, heads, key/value heads, edges: "
            f"{sorted(shapes)}); a submission holds one model's circuits"
        )
    if len(graphs) != len(SUBMISSION_PERCENTAGES):
        raise FileFormatError(
            f"{folder}: holds {len(graphs)} circuit files; MIB expects one file of importance scores or "
            f"{len(SUBMISSION_PERCENTAGES)} circuits, one per budget {list(SUBMISSION_PERCENTAGES)}%"
        )
    weights = mib_edge_weights(graphs[0])
    sizes = [int(weights[g.in_graph & g.valid].sum()) for g in graphs]
    ordered = [g for _, g in sorted(zip(sizes, graphs), key=lambda pair: pair[0])]
    total = int(weights.sum())
    for percent, size in zip(SUBMISSION_PERCENTAGES, sorted(sizes)):
        if size > percent / 100 * total:
            raise FileFormatError(
                f"{folder}: the circuits do not fit MIB's budgets: the one for {percent:g}% holds {size} of "
                f"{total} edges (MIB's count)"
            )
    return ordered


def _check_mib_graph(graph: Graph) -> None:
    """`InputError` for a grouped-query model's grouped graph: MIB's edges are those of the ungrouped one."""
    spec = graph.spec
    if spec.n_kv_heads != spec.n_heads:
        raise InputError(
            f"MIB's graph of a grouped-query model gives each of the {spec.n_heads} query heads its own k "
            f"and v inputs; this graph has {spec.n_kv_heads} key/value heads' (edge names MIB cannot "
            "read). Score Graph.from_model(model, ungrouped=True) for a submission (or convert a circuit "
            "with graph.ungrouped())"
        )


def _check_kind(kind: str) -> str:
    if kind not in ("json", "pt"):
        raise InputError(f"MIB reads .json or .pt circuit files, got kind {kind!r}")
    return kind
