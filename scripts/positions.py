"""Position-aware IOI circuits against position-agnostic ones (issue: position-aware circuits; PEAP,
Haklay et al. 2025, arXiv 2502.04577).

One EAP-IG run on a SpanGraph scores every span edge and crossing edge; the position-agnostic scores are
their sums over spans (the same run, exactly). Reports
- how much the top-1% edge set moves when positions are kept apart: edges ranked by |sum over spans| (what
  a position-agnostic method sees, signs cancelling) against edges ranked by sum over spans of |score|;
- faithfulness against circuit size in concrete edges per example (PEAP's count: a span edge is one edge
  per position of its span, a crossing edge one per key-query pair) for top-n circuits of both kinds,
  evaluated on held-out pairs, and the size each needs to reach faithfulness 0.8;
- the time of the scoring run, and of the position-agnostic run on the same pairs.

    python scripts/positions.py --model smollm2-135m --n 48 --out outputs/positions
    python scripts/positions.py --model random-gpt2-small --n 32
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from circuits_tasks import ioi_pairs
from reproduce_ioi import build_model
from torch import Tensor

from circuits import Graph, attribute, evaluate
from circuits.span_graph import SpanGraph, concrete_edges
from circuits.spans import Spans


def top_share_change(agnostic: Tensor, per_span: Tensor, valid: Tensor, share: float = 0.01) -> float:
    """1 - |A & B| / k for the top-k (k = share of the edges) by |agnostic| (A) and by sum_s |per_span|
    (B)."""
    k = max(1, math.ceil(share * int(valid.sum())))
    a = set(torch.topk(agnostic.abs()[valid], k).indices.tolist())
    b = set(torch.topk(per_span.abs().sum(0)[valid], k).indices.tolist())
    return 1 - len(a & b) / k


def sweep(model, circuits, test, **settings) -> list[dict[str, float]]:
    rows = []
    for n, circuit, size in circuits:
        result = evaluate(model, circuit, test, **settings)
        rows.append(
            {"n": n, "edges": circuit.n_in_graph, "concrete": size, "faithfulness": result.faithfulness}
        )
        print(f"  n={n:6d} edges={circuit.n_in_graph:6d} concrete={size:10.0f} f={result.faithfulness:.3f}")
    return rows


def needed(rows: list[dict[str, float]], target: float = 0.8) -> dict[str, float | None]:
    """The smallest concrete size in the sweep whose faithfulness reaches `target`, and the smallest from
    which every larger circuit of the sweep does (None: none)."""
    reached = [row["concrete"] for row in rows if row["faithfulness"] >= target]
    stays = [
        row["concrete"] for i, row in enumerate(rows) if all(r["faithfulness"] >= target for r in rows[i:])
    ]
    return {"first": min(reached) if reached else None, "from then on": min(stays) if stays else None}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=48, help="IOI pairs: half to score, half to evaluate")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--budgets", default="10,30,100,300,1000,3000,10000")
    parser.add_argument("--out", default="outputs/positions")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model)
    task = ioi_pairs(model, args.n, seed=0)
    if task.spans is None:
        raise SystemExit("the model's tokenizer gives no character offsets: no IOI spans")
    spans = task.spans
    pairs = spans.attach(task.pairs)
    half = len(pairs) // 2
    fit, test = pairs[:half], pairs[half:]
    settings = {"method": "eap-ig-inputs", "ig_steps": args.ig_steps, "batch_size": args.batch_size}
    print(f"{model.spec.name}: {len(fit)} pairs to score, {len(test)} to evaluate; spans {list(spans.names)}")

    start = time.perf_counter()
    graph = SpanGraph.from_model(model, spans)
    result = attribute(model, graph, fit, quiet=True, **settings)
    span_seconds = time.perf_counter() - start
    start = time.perf_counter()
    plain = Graph.from_model(model)
    attribute(model, plain, fit, quiet=True, **settings)
    plain_seconds = time.perf_counter() - start
    assert result.span_edge_scores is not None and result.edge_scores is not None
    summed = (result.span_edge_scores.sum(0) - plain.scores).abs().max() / plain.scores.abs().max()
    change = top_share_change(plain.scores, result.span_edge_scores, plain.valid)
    print(
        f"scoring: {span_seconds:.1f} s per span (crossing edges too), {plain_seconds:.1f} s position-summed"
    )
    print(f"span scores summed over spans vs the position-summed run: max relative gap {float(summed):.2e}")
    print(f"top-1% edge set change (|sum over spans| vs sum of |per span|): {change:.1%}")

    budgets = [int(b) for b in args.budgets.split(",")]
    assert test.span_index is not None
    test_spans = Spans(spans.names, test.span_index.cpu())
    print("position-aware circuits (span + crossing edges, top-n, pruned):")
    aware = sweep(
        model,
        [(n, c, c.concrete_edges(test_spans)) for n in budgets for c in [graph.top_n(n)]],
        test,
        batch_size=args.batch_size,
    )
    print("position-agnostic circuits (top-n, pruned):")
    agnostic = sweep(
        model,
        [
            (n, c, concrete_edges(c, test_spans))
            for n in budgets
            if n <= plain.n_edges
            for c in [plain.top_n(n)]
        ],
        test,
        batch_size=args.batch_size,
    )
    summary = {
        "model": model.spec.name,
        "pairs": {"scored": len(fit), "evaluated": len(test)},
        "spans": list(spans.names),
        "method": settings,
        "seconds": {"span graph": span_seconds, "position-summed": plain_seconds},
        "top1_change": change,
        "aware": aware,
        "agnostic": agnostic,
        "concrete_for_0.8": {"aware": needed(aware), "agnostic": needed(agnostic)},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"concrete edges for faithfulness 0.8: {summary['concrete_for_0.8']}")
    print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
