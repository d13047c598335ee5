"""IOI circuit discovery, end to end: load a model, make IOI pairs, score edges, select, evaluate, save.

    python scripts/reproduce_ioi.py --model smollm2-135m --out outputs/ioi

Writes scores.pt, circuit.json, summary.json into --out and prints the graph summary, the model's IOI
baseline, the IG completeness, the top heads and the circuit's faithfulness.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from circuits import Graph, load_model
from circuits.attribution import attribute
from circuits.evaluation import evaluate
from tasks import baseline, ioi_pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="smollm2-135m", help="embedded 'smollm2-135m' or a hub name / folder"
    )
    parser.add_argument("--out", default="outputs/ioi", help="output folder")
    parser.add_argument("--n", type=int, default=32, help="IOI prompt pairs")
    parser.add_argument("--method", default="eap-ig-inputs")
    parser.add_argument("--steps", type=int, default=5, help="IG steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--edges", type=int, default=300, help="edges kept in the circuit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.time()
    model = load_model(args.model)
    print(f"Loaded {model} in {time.time() - start:.1f} s")
    graph = Graph.from_model(model)
    print(graph.summary())

    data = ioi_pairs(model, args.n, seed=args.seed)
    pairs = data.pairs
    print(
        f"\nIOI: {len(pairs)} pairs ({data.dropped} proposals dropped: multi-token answers, unequal lengths)"
    )
    for clean, corrupted in pairs.texts[:3]:
        print(f"  clean: {clean!r}\n  corrupted: {corrupted!r}")
    base = baseline(model, pairs)
    print(f"Baseline: {base}")

    t0 = time.time()
    result = attribute(
        model, graph, pairs, "logit_diff", args.method, ig_steps=args.steps, batch_size=args.batch_size
    )
    print(f"\n{args.method}: {time.time() - t0:.1f} s for {len(pairs)} pairs")
    if result.completeness is not None:
        print(result.completeness)

    heads = [i for i, name in enumerate(graph.sources) if name.startswith("a")]
    node_scores = result.node_scores if result.node_scores is not None else torch.zeros(graph.n_sources)
    order = sorted(heads, key=lambda i: float(node_scores[i]))
    print("\nTop heads (most negative score = ablating the head hurts the logit difference most):")
    for i in order[:12]:
        print(
            f"  {graph.sources[i]:<10} layer {graph.sources[i][1:].split('.')[0]:>2}  "
            f"score {float(node_scores[i]):+.4f}"
        )

    circuit = graph.top_n(min(args.edges, graph.n_edges))
    evaluation = evaluate(model, circuit, pairs, batch_size=args.batch_size)
    print(
        f"\nCircuit of {args.edges} edges: M(circuit) {evaluation.circuit:.3f}, "
        f"M(full) {evaluation.full:.3f}, "
        f"M(empty) {evaluation.empty:.3f}, faithfulness {evaluation.faithfulness:.3f}"
    )

    torch.save(
        {
            "edge_scores": result.edge_scores,
            "node_scores": result.node_scores,
            "sources": graph.sources,
            "destinations": graph.destinations,
        },
        out / "scores.pt",
    )
    circuit.to_json(out / "circuit.json")
    summary = {
        "model": args.model,
        "method": args.method,
        "ig_steps": args.steps,
        "n_pairs": len(pairs),
        "baseline": vars(base),
        "completeness": None if result.completeness is None else vars(result.completeness),
        "top_heads": [[graph.sources[i], float(node_scores[i])] for i in order[:12]],
        "circuit_edges": args.edges,
        "faithfulness": evaluation.faithfulness,
        "metric_circuit": evaluation.circuit,
        "metric_full": evaluation.full,
        "metric_empty": evaluation.empty,
        "seconds": time.time() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nWrote {', '.join(p.name for p in sorted(out.iterdir()))} to {out}/ "
        f"({time.time() - start:.0f} s total)"
    )


if __name__ == "__main__":
    main()
