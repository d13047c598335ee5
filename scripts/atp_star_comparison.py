"""AtP vs AtP* (Kramár et al. 2024, arXiv 2403.00745) as estimates of node-level activation patching.

Node scores of the heads and MLPs on IOI: exact patching (`method="exact", level="node"`: each node's
every outgoing edge patched at once), AtP (`eap`), AtP with the QK fix (`atp*` at edge level, the edge
scores summed per source) and full AtP* (`atp*` at node level: QK fix and GradDrop, a magnitude). Reports
Pearson correlations (signed estimates against the signed effect, magnitudes against its magnitude) and the
recall of the k nodes with the largest |effect| among the k largest estimates. Then the edges the QK fix is
about: q/k edges (the `--edges` largest by |AtP|, as many largest by |AtP + QK fix|, as many at random)
against exact edge patching, one edge at a time.

    python scripts/atp_star_comparison.py --n 16 --k 20
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from circuits_tasks import ioi_pairs
from torch import Tensor

from circuits import Graph, attribute, load_model
from circuits.data import PromptPairs
from circuits.evaluation import ablated_outputs
from circuits.intervention import forward_with_ablation
from circuits.metrics import logit_diff
from circuits.models import HookedModel


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()))


def recall(truth: Tensor, estimate: Tensor, k: int) -> float:
    top = set(truth.abs().topk(k).indices.tolist())
    return len(top & set(estimate.abs().topk(k).indices.tolist())) / k


def exact_edges(model: HookedModel, graph: Graph, pairs: PromptPairs, edges: list[tuple[int, int]]) -> Tensor:
    """M(only that edge patched to its corrupted value) - M(clean), mean over examples, per edge."""
    b = len(pairs)
    corrupted, _, _ = ablated_outputs(model, graph, pairs, None)
    with torch.no_grad():
        base = logit_diff(model(pairs.clean, pairs.attention_mask), pairs)
    out = torch.zeros(len(edges))
    per = 4
    for first in range(0, len(edges), per):
        chunk = edges[first : first + per]
        mask = torch.zeros(len(chunk) * b, graph.n_sources, graph.n_destinations, dtype=torch.bool)
        for i, (u, v) in enumerate(chunk):
            mask[i * b : (i + 1) * b, u, v] = True
        ids, attn = pairs.clean.repeat(len(chunk), 1), pairs.attention_mask.repeat(len(chunk), 1)
        with torch.no_grad():
            logits = forward_with_ablation(model, graph, ids, attn, corrupted, mask)
        values = logit_diff(logits, pairs.repeat(len(chunk))).reshape(len(chunk), b)
        out[first : first + len(chunk)] = (values - base).mean(1).cpu()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--edges", type=int, default=50, help="q/k edges per selection (default 50)")
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

    eap_edges = attribute(
        model, graph, pairs, method="eap", batch_size=args.batch_size, quiet=True
    ).edge_scores
    star_edges = attribute(
        model, graph, pairs, method="atp*", batch_size=args.batch_size, quiet=True
    ).edge_scores
    assert eap_edges is not None and star_edges is not None
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

    qk = torch.zeros_like(graph.valid)
    for layer in range(graph.spec.n_layers):
        for letter in ("q", "k"):
            qk[:, graph.qkv_destinations(layer, letter)] = True
    qk &= graph.valid
    pool = qk.nonzero().tolist()
    chosen: set[tuple[int, int]] = set()
    for scores in (eap_edges, star_edges):
        flat = scores.abs().masked_fill(~qk, -1).flatten().topk(args.edges).indices
        chosen |= {(int(i) // graph.n_destinations, int(i) % graph.n_destinations) for i in flat}
    chosen |= {tuple(e) for e in random.Random(0).sample(pool, args.edges)}  # type: ignore[misc]
    edges = sorted(chosen)
    start = time.perf_counter()
    truth = exact_edges(model, graph, pairs, edges)
    rows, cols = torch.tensor([u for u, _ in edges]), torch.tensor([v for _, v in edges])
    print(f"\n{len(edges)} q/k edges against exact edge patching ({time.perf_counter() - start:.0f} s)")
    print(f"| estimate | Pearson | mean abs error | top-{args.k} recall |\n|---|---|---|---|")
    for label, scores in (("AtP (eap)", eap_edges), ("AtP + QK fix (atp*)", star_edges)):
        est = scores[rows, cols]
        error = float((est - truth).abs().mean())
        print(f"| {label} | {pearson(est, truth):.3f} | {error:.4f} | {recall(truth, est, args.k):.2f} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
