"""AtP vs AtP* (Kramár et al. 2024, arXiv 2403.00745) as estimates of node-level activation patching.

Node scores of the heads and MLPs on IOI: exact patching (`method="exact", level="node"`: each node's
every outgoing edge patched at once), AtP (`eap`), AtP with the QK fix (`atp*` at edge level, the edge
scores summed per source) and full AtP* (`atp*` at node level: QK fix and GradDrop, a magnitude). Reports
Pearson correlations (signed estimates against the signed effect, magnitudes against its magnitude) and the
recall of the k nodes with the largest |effect| among the k largest estimates.

    python scripts/atp_star_comparison.py --n 16 --k 20
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from circuits import Graph, attribute, load_model
from tasks import ioi_pairs


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()))


def recall(truth: Tensor, estimate: Tensor, k: int) -> float:
    top = set(truth.abs().topk(k).indices.tolist())
    return len(top & set(estimate.abs().topk(k).indices.tolist())) / k


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    model = load_model(args.model)
    pairs = ioi_pairs(model, args.n, seed=0).pairs
    graph = Graph.from_model(model)
    seconds = {}

    def run(label: str, **options) -> Tensor:
        start = time.perf_counter()
        result = attribute(model, graph, pairs, batch_size=args.batch_size, quiet=True, **options)
        seconds[label] = time.perf_counter() - start
        assert result.node_scores is not None
        return result.node_scores[1:]  # heads and MLPs (the input is the whole effect)

    exact = run("exact", method="exact", level="node")
    estimates = {
        "AtP (eap)": run("AtP (eap)", method="eap", level="node"),
        "AtP + QK fix (atp*, edge level)": run("AtP + QK fix (atp*, edge level)", method="atp*"),
        "AtP* (QK fix + GradDrop, node level)": run(
            "AtP* (QK fix + GradDrop, node level)", method="atp*", level="node"
        ),
    }
    print(f"\n{args.model}, IOI, {args.n} pairs, {exact.numel()} head and MLP nodes")
    print(f"| estimate | Pearson (signed) | Pearson of magnitudes | top-{args.k} recall | seconds |")
    print("|---|---|---|---|---|")
    for label, scores in estimates.items():
        signed = "" if "GradDrop" in label else f"{pearson(scores, exact):.3f}"
        magnitudes = pearson(scores.abs(), exact.abs())
        found = recall(exact, scores, args.k)
        print(f"| {label} | {signed} | {magnitudes:.3f} | {found:.2f} | {seconds[label]:.1f} |")
    print(f"exact node patching: {seconds['exact']:.1f} s")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
