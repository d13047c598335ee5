"""How the attribution methods agree on SmolLM2 IOI, and how complete EAP-IG is under each quadrature rule.

Prints (and writes as JSON):
- IG completeness for `eap-ig-inputs` with m steps under left / midpoint / trapezoid / Gauss-Legendre:
  the mean over examples of sum_d (e_clean - e_corr) . mean gradient vs M(clean) - M(corrupted);
- Spearman and Pearson correlations between the node scores of `eap`, `eap-ig-inputs` and node-level
  `exact` patching (the ground truth), and between the edge scores of `eap` and `eap-ig-inputs`.

    python scripts/compare_methods.py --n 32 --out outputs/compare.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from circuits_tasks import ioi_pairs
from torch import Tensor

from circuits import Graph, attribute, load_model


def ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1 (ties broken by position; the scores compared here are continuous)."""
    r = torch.empty(x.numel(), dtype=torch.float64)
    r[x.flatten().argsort()] = torch.arange(x.numel(), dtype=torch.float64)
    return r


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def spearman(a: Tensor, b: Tensor) -> float:
    return pearson(ranks(a), ranks(b))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("outputs/compare.json"))
    args = parser.parse_args()

    model = load_model(args.model)
    pairs = ioi_pairs(model, args.n, seed=0).pairs
    graph = Graph.from_model(model)
    report: dict[str, dict] = {"completeness": {}, "node_correlation": {}, "edge_correlation": {}}

    for rule in ("left", "midpoint", "trapezoid", "gauss-legendre"):
        result = attribute(
            model, graph, pairs, method="eap-ig-inputs", ig_steps=args.steps, quadrature=rule, quiet=True
        )
        c = result.completeness
        assert c is not None
        report["completeness"][rule] = {
            "ig_total": c.ig_sum,
            "metric_delta": c.metric_delta,
            "mean_abs_error": c.abs_error,
            "relative_error": c.relative_error,
        }
        print(f"m={args.steps} {rule:15s} {c}")

    results = {
        "eap": attribute(model, graph, pairs, method="eap", batch_size=args.batch_size),
        "eap-ig-inputs": attribute(
            model, graph, pairs, method="eap-ig-inputs", ig_steps=args.steps, batch_size=args.batch_size
        ),
        "exact (node)": attribute(
            model, graph, pairs, method="exact", level="node", batch_size=args.batch_size
        ),
    }
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x, y = results[a].node_scores, results[b].node_scores
            assert x is not None and y is not None
            key = f"{a} vs {b}"
            report["node_correlation"][key] = {"spearman": spearman(x, y), "pearson": pearson(x, y)}
            print(f"nodes  {key:32s} spearman {spearman(x, y):.3f}  pearson {pearson(x, y):.3f}")
    valid = graph.valid
    x, y = results["eap"].edge_scores, results["eap-ig-inputs"].edge_scores
    assert x is not None and y is not None
    edge = {"spearman": spearman(x[valid], y[valid]), "pearson": pearson(x[valid], y[valid])}
    report["edge_correlation"]["eap vs eap-ig-inputs"] = edge
    print(f"edges  eap vs eap-ig-inputs  spearman {edge['spearman']:.3f}  pearson {edge['pearson']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"model": args.model, "n": args.n, "steps": args.steps, **report}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
