"""Faithfulness curves and MIB CPR / CMD of EAP, EAP-IG-inputs and node-level exact patching on IOI.

For each method: scores on the task's prompt pairs, then circuits at the MIB edge budgets (0.1% ... 100% of
edges, pruned), evaluated with every other edge patched from the corrupted run. CPR uses signed selection
(edges that help the metric most), CMD absolute selection. Node-level exact patching guides a node
selection (the largest set of best nodes within each edge budget). A random-circuit baseline runs at the
same budgets. Writes curves.png, curves.json and a drawing of the EAP-IG circuit at `--draw-edges` edges.

    python scripts/faithfulness_curves.py --n 64 --out outputs/faithfulness     # about 20 minutes on 2 cores

Scores are kept in the output folder (scores-<method>-<level>-n<N>.pt) and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Literal

from circuits_tasks import ioi_pairs

from circuits import Graph, attribute, load_model
from circuits.attribution.methods import MethodName
from circuits.evaluation.curves import FaithfulnessCurve, faithfulness_curve, mib_scores
from circuits.pictures.drawing import draw_circuit, plot_curves
from circuits.selection.strategies import Selection


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64, help="IOI prompt pairs (scoring and evaluation)")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--draw-edges", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("outputs/faithfulness"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = load_model(args.model)
    pairs = ioi_pairs(model, args.n, seed=0).pairs
    common = {"batch_size": args.batch_size}
    scored: dict[str, tuple[Graph, Selection]] = {}
    seconds: dict[str, float] = {}
    runs: list[tuple[str, MethodName, Literal["edge", "node"], Selection]] = [
        ("EAP", "eap", "edge", "top_n"),
        (f"EAP-IG-inputs (m={args.steps})", "eap-ig-inputs", "edge", "top_n"),
        ("exact patching (nodes)", "exact", "node", "nodes"),
    ]
    for label, method, level, selection in runs:
        cached = args.out / f"scores-{method}-{level}-n{args.n}.pt"  # exact node scores take a while
        if cached.exists():
            graph = Graph.from_pt(cached)
            print(f"{label}: scores read from {cached}")
        else:
            graph = Graph.from_model(model)
            start = time.perf_counter()
            attribute(model, graph, pairs, method=method, level=level, ig_steps=args.steps, **common)
            seconds[label] = time.perf_counter() - start
            graph.to_pt(cached)
        scored[label] = (graph, selection)

    report: dict = {"model": args.model, "n": args.n, "scoring_seconds": seconds, "methods": {}}
    curves: list[FaithfulnessCurve] = []
    for label, (graph, selection) in scored.items():
        scores = mib_scores(model, graph, pairs, selection=selection, label=label, **common)
        curves += [scores.signed, scores.absolute]
        report["methods"][label] = {
            "CPR": scores.cpr,
            "CMD": scores.cmd,
            "signed": scores.signed.to_dict(),
            "absolute": scores.absolute.to_dict(),
        }
        print(f"{label:28s} CPR {scores.cpr:.3f}  CMD {scores.cmd:.3f}")
    random = faithfulness_curve(model, scored["EAP"][0], pairs, selection="random", label="random", **common)
    curves.append(random)
    report["random"] = {"CPR": random.area_under, "CMD": random.area_from_one, "curve": random.to_dict()}
    print(f"{'random':28s} CPR {random.area_under:.3f}  CMD {random.area_from_one:.3f}")

    print("\nfaithfulness by budget (absolute selection)")
    print("budget % | " + " | ".join(c.label for c in curves if c.absolute))
    for i, percent in enumerate(p.percent for p in curves[1].points):
        row = " | ".join(f"{c.points[i].faithfulness:.3f}" for c in curves if c.absolute)
        print(f"{percent:>8} | {row}")

    plot_curves(curves, args.out / "curves.png", title=f"IOI on {args.model}, {args.n} pairs")
    (args.out / "curves.json").write_text(json.dumps(report, indent=2))
    ig_graph = scored[f"EAP-IG-inputs (m={args.steps})"][0]
    circuit = ig_graph.top_n(args.draw_edges)
    draw_circuit(circuit, args.out / "circuit.svg", title=f"EAP-IG IOI circuit ({circuit.n_in_graph} edges)")
    circuit.to_json(args.out / "circuit.json")
    print(f"wrote {args.out}/curves.png, curves.json, circuit.svg, circuit.json")


if __name__ == "__main__":
    main()
