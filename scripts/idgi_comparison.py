"""Integration rules at few steps: completeness and agreement, on the embedded model (SmolLM2 IOI).

1. Node level, EAP-IG-inputs: for left / midpoint / Gauss-Legendre at m = 2, 5, 10, 20, the completeness
   error (mean over examples of |IG total - (M(clean) - M(corrupted))|, relative to the mean metric change)
   and the Spearman rank correlation of the node scores with node-level exact patching. IDGI has no
   node or edge scores (`attribute` refuses it; see circuits/quadrature.py).
2. Token IG (GrAInS' attribution) of the answer's logit on IOI prompts, from a baseline of " the"
   embeddings: for the four rules (IDGI included) at the same m, the completeness error (mean over prompts
   of |sum of scores - (f(input) - f(baseline))|, relative to the mean |f(input) - f(baseline)|) and the
   overlap of the top-3 tokens with a Gauss-Legendre reference at m = 256.

    python scripts/idgi_comparison.py --n 16 --prompts 8
"""

from __future__ import annotations

import argparse
import time

import torch
from circuits_tasks import ioi_pairs

from circuits import Graph, attribute, load_model
from circuits.quadrature import Quadrature
from circuits.steering import token_embeddings, token_ig

STEPS = (2, 5, 10, 20)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def node_table(model, n: int) -> list[str]:
    task = ioi_pairs(model, n, seed=0)
    graph = Graph.from_model(model)
    exact = attribute(model, graph, task.pairs, method="exact", level="node", quiet=True).node_scores
    rows = ["| rule | m | completeness error | Spearman with exact (nodes) |", "|---|---|---|---|"]
    rules: tuple[Quadrature, ...] = ("left", "midpoint", "gauss-legendre")
    for rule in rules:
        for m in STEPS:
            result = attribute(
                model,
                graph,
                task.pairs,
                method="eap-ig-inputs",
                level="node",
                ig_steps=m,
                quadrature=rule,
                quiet=True,
            )
            assert result.completeness is not None and result.node_scores is not None and exact is not None
            rho = spearman(result.node_scores[1:], exact[1:])  # heads and MLPs (the input is one node)
            rows.append(f"| {rule} | {m} | {result.completeness.relative_error:.1%} | {rho:.3f} |")
    rows.append("| idgi | any | refused (no node or edge decomposition) | |")
    return rows


def token_table(model, n_prompts: int) -> list[str]:
    task = ioi_pairs(model, n_prompts, seed=1)
    prompts = [clean for clean, _ in task.pairs.texts]
    answers = task.pairs.answer.tolist()

    def attribution(prompt: str, answer: int, rule: Quadrature, m: int):
        n = len(model.to_ids([prompt])[0])
        base = token_embeddings(model, [model.single_token_id(" the")] * n)
        return token_ig(model, prompt, target=answer, baseline=base, steps=m, quadrature=rule)

    references = [attribution(p, a, "gauss-legendre", 256) for p, a in zip(prompts, answers)]
    scale = sum(abs(r.delta) for r in references) / len(references)
    ref_error = sum(r.abs_error for r in references) / len(references) / scale
    rows = [
        f"Reference (Gauss-Legendre, m = 256): completeness error {ref_error:.2%}; "
        f"mean |f(x) - f(x')| {scale:.3f}",
        "",
        "| rule | m | completeness error | top-3 overlap with GL m = 256 |",
        "|---|---|---|---|",
    ]
    rules: tuple[Quadrature, ...] = ("left", "midpoint", "gauss-legendre", "idgi")
    for rule in rules:
        for m in STEPS:
            errors, overlaps = [], []
            for prompt, answer, ref in zip(prompts, answers, references):
                got = attribution(prompt, answer, rule, m)
                errors.append(got.abs_error)
                top = set(got.scores.topk(3).indices.tolist())
                overlaps.append(len(top & set(ref.scores.topk(3).indices.tolist())) / 3)
            error, overlap = sum(errors) / len(errors) / scale, sum(overlaps) / len(overlaps)
            rows.append(f"| {rule} | {m} | {error:.1%} | {overlap:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=16, help="IOI pairs for the node table")
    parser.add_argument("--prompts", type=int, default=8, help="IOI prompts for the token table")
    parser.add_argument("--tables", nargs="+", choices=("nodes", "tokens"), default=["nodes", "tokens"])
    args = parser.parse_args()
    model = load_model(args.model)
    start = time.perf_counter()
    if "nodes" in args.tables:
        print("\n".join(node_table(model, args.n)) + "\n")
    if "tokens" in args.tables:
        print("\n".join(token_table(model, args.prompts)))
    print(f"\n({time.perf_counter() - start:.0f} s, torch {torch.__version__})")


if __name__ == "__main__":
    main()
