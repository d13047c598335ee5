"""Every result a refactoring must leave bit for bit as it was: save them at one commit, compare at another.

On the tiny Llama (grouped-query attention) and GPT-2 layouts, and the post-norm, shared-norm, residual-
multiplier and flattened-MLP ones: every attribution method's edge scores and node scores (with mean
ablation, the recomputed path and the memory budget where they apply), the top-n circuits built from them,
their faithfulness (`evaluate`, `evaluate_many`), refinement, MIB's CPR / CMD, head patching, token IG
(two rules, both forms), and neuron IG (both paths);
refusals are recorded by their message. With
`--demo DIR`, also the demo's files (`make demo` writes outputs/ioi: scores.pt, summary.json less its
timing).

    python scripts/fingerprint.py save /tmp/before.pt [--demo outputs/ioi]
    ... change the code ...
    python scripts/fingerprint.py compare /tmp/before.pt [--demo outputs/ioi]

`compare` exits 1 and names every result that is not bit-identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any

import torch

from circuits import Graph, attribute, head_patching, load_model
from circuits.attribution.methods import MethodName
from circuits.errors import CircuitsError
from circuits.evaluation import evaluate, evaluate_many
from circuits.evaluation.curves import mib_scores
from circuits.evaluation.refinement import refine
from circuits.models.hooked import HookedModel
from circuits.neurons import neuron_ig
from circuits.steering import token_ig
from circuits.testing import tiny_gpt2_hf, tiny_llama_hf, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.architectures import ARCHITECTURES  # the block layouts the engine tells apart
from tests.pairs import PAIRS, make_pairs


def models() -> dict[str, HookedModel]:
    found = {"llama": tiny_llama_hf(), "gpt2": tiny_gpt2_hf()}
    for name in ("gemma2", "phi", "granite", "opt"):
        found[name] = next(a for a in ARCHITECTURES if a.name == name).build()
    return {name: load_model(hf, tiny_tokenizer()) for name, hf in found.items()}


def results(model: HookedModel) -> dict[str, Any]:
    pairs = make_pairs(model)
    clean, _, answers, _ = zip(*PAIRS)
    found: dict[str, Any] = {}
    eap_graph = None
    for method in typing.get_args(MethodName):
        for level in ("edge", "node"):
            torch.manual_seed(0)
            graph = Graph.from_model(model)
            key = f"{method}/{level}"
            try:
                run = attribute(model, graph, pairs, method=method, level=level, batch_size=2, quiet=True)
            except CircuitsError as refused:  # a refusal is a result too
                found[f"{key}/refused"] = str(refused)
                continue
            found[f"{key}/scores"] = run.edge_scores if level == "edge" else run.node_scores
            if level == "edge":
                found[f"{key}/graph.scores"] = graph.scores.clone()
                circuit = graph.top_n(graph.n_edges // 5)
                found[f"{key}/top20%"] = circuit.in_graph.clone()
                found[f"{key}/faithfulness"] = torch.tensor(evaluate(model, circuit, pairs).faithfulness)
                if method == "eap":
                    eap_graph = graph
    variants: list[tuple[MethodName, dict]] = [
        ("eap", dict(ablation="mean")),
        ("eap-ig-activations", dict(ablation="zero")),
        ("eap-ig-inputs", dict(recompute=True, max_rows=1)),
        ("eap-ig-inputs", dict(max_memory=0.52)),
    ]
    for method, options in variants:
        name = ",".join(f"{k}={v}" for k, v in options.items())
        graph = Graph.from_model(model)
        run = attribute(model, graph, pairs, method=method, batch_size=2, quiet=True, **options)
        found[f"{method}[{name}]/scores"] = run.edge_scores
    assert eap_graph is not None
    circuits = [eap_graph.top_n(max(1, eap_graph.n_edges * k // 100)) for k in (5, 20, 60)]
    for ablation in ("patching", "mean", "zero"):
        many = evaluate_many(model, circuits, pairs, ablation=ablation)  # type: ignore[arg-type]
        found[f"evaluate_many[{ablation}]"] = torch.stack([e.per_example for e in many])
    found["refine"] = refine(model, circuits[0], pairs, budget=8, rounds=2).in_graph
    mib = mib_scores(model, eap_graph, pairs, quiet=True)
    found["mib"] = torch.tensor([mib.cpr, mib.cmd])
    prompts, targets = list(clean), list(answers)
    found["head_patching"] = head_patching(model, pairs, batch_size=2, max_rows=8, quiet=True)
    for quadrature in ("gauss-legendre", "idgi"):
        for target in ({"continuation": answers[0]}, {"target": answers[0]}):
            tokens = token_ig(model, clean[0], steps=6, max_rows=4, quadrature=quadrature, **target)  # type: ignore[arg-type]
            found[f"token_ig[{quadrature},{next(iter(target))}]"] = torch.cat(
                [tokens.scores, torch.tensor([tokens.delta])]
            )
    for implementation in ("cached", "full"):
        try:
            ig = neuron_ig(model, prompts, targets, steps=4, implementation=implementation, quiet=True)
        except (CircuitsError, RuntimeError) as refused:
            found[f"neuron_ig[{implementation}]"] = f"refused: {type(refused).__name__}"
            continue
        found[f"neuron_ig[{implementation}]"] = torch.cat([ig.scores.flatten(), ig.prob_delta.flatten()])
    return found


def demo_files(folder: Path) -> dict[str, object]:
    scores = torch.load(folder / "scores.pt")
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("seconds", None)
    return {"scores": scores, "summary": summary}


def differences(before: object, after: object, name: str) -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        if before.keys() != after.keys():
            return [f"{name}: keys {sorted(before)} != {sorted(after)}"]
        return [d for key in before for d in differences(before[key], after[key], f"{name}/{key}")]
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor):
        same = before.shape == after.shape and before.dtype == after.dtype and torch.equal(before, after)
        if same:
            return []
        if before.shape != after.shape:
            return [f"{name}: shape {tuple(before.shape)} != {tuple(after.shape)}"]
        gap = (before.double() - after.double()).abs().max().item()
        return [f"{name}: differs by up to {gap:.3g}"]
    return [] if before == after else [f"{name}: {before!r} != {after!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["save", "compare"])
    parser.add_argument("path")
    parser.add_argument("--demo", help="the demo's output folder (outputs/ioi after `make demo`)")
    args = parser.parse_args()
    torch.manual_seed(0)
    found: dict[str, dict[str, Any]] = {name: results(model) for name, model in models().items()}
    if args.demo:
        found["demo"] = demo_files(Path(args.demo))
    if args.action == "save":
        torch.save(found, args.path)
        print(f"saved {sum(len(v) for v in found.values())} results to {args.path}")
        return 0
    before = torch.load(args.path)
    if "demo" in before and "demo" not in found:
        print("the demo's files are not compared (no --demo)")
        before.pop("demo")
    wrong = differences(before, found, "")
    total = sum(len(v) for v in found.values())
    print("\n".join(wrong) if wrong else f"all {total} results bit-identical")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
