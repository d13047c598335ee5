"""IOI circuit discovery end to end: GPT-2 small where the hub is reachable, else the embedded SmolLM2.

EAP-IG-inputs on IOI, a pruned circuit of --edges edges, its faithfulness, faithfulness curves over the MIB
budgets (CPR, CMD), and a head-level summary; for GPT-2 small also the overlap of the top heads with the
head classes of Wang et al. (2022). Writes scores.pt, circuit.json, circuit.svg, circuit.html (the interactive
page), faithfulness.png and summary.json to --out.

    python scripts/reproduce_ioi.py                          # gpt2 if the hub answers, else smollm2-135m
    python scripts/reproduce_ioi.py --model smollm2-135m --out outputs/ioi
    python scripts/reproduce_ioi.py --model random-gpt2-small --no-curve   # offline GPT-2-shaped check
    python scripts/reproduce_ioi.py --model gpt2 --device cuda --n 512 --batch-size 64   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch
from circuits_tasks import ioi_pairs
from circuits_tasks.ioi import WANG_2022_HEADS, head_class_overlap
from transformers import GPT2Config, GPT2LMHeadModel

from circuits import load_model
from circuits.cli import DTYPES
from circuits.models.hooked import HookedModel
from circuits.pipeline import Discovery, discover
from circuits.testing import tiny_tokenizer


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def build_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> HookedModel:
    if name == "auto":
        name = "gpt2" if hub_reachable() else "smollm2-135m"
    if name == "random-gpt2-small":  # GPT-2 small's architecture with random weights, offline
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config()).eval()
        return load_model(hf, tiny_tokenizer(), device=device, dtype=dtype)
    return load_model(name, device=device, dtype=dtype)


def report(found: Discovery, model: HookedModel) -> None:
    print(f"\nIOI: {found.task}; baseline: {found.baseline}")
    for clean, corrupted in found.task.pairs.texts[:2]:
        print(f"  clean: {clean!r}\n  corrupted: {corrupted!r}")
    if found.attribution.completeness is not None:
        print(found.attribution.completeness)
    print("\nTop heads (most negative score: ablating the head lowers the logit difference most):")
    for head in found.heads:
        print(f"  head {head.name:>6}  (layer {head.layer:>2})  score {head.score:+.4f}")
    if is_gpt2_small(model):
        overlap = head_class_overlap([h.name for h in found.heads])
        print("\nOverlap of the top heads with Wang et al. (2022) head classes:")
        for name, members in WANG_2022_HEADS.items():
            print(f"  {name:<20} {len(overlap[name])}/{len(members)}  {', '.join(overlap[name]) or '-'}")
    e = found.evaluation
    faithfulness = found.faithfulness_interval or f"{e.faithfulness:.3f}"
    print(
        f"\nCircuit of {found.circuit.n_in_graph} edges (after pruning): M(circuit) {e.circuit:.3f}, "
        f"M(full) {e.full:.3f}, M(empty) {e.empty:.3f}, faithfulness {faithfulness}"
    )
    if found.curves is not None:
        cpr, cmd = (
            found.curves.cpr_interval or found.curves.cpr,
            found.curves.cmd_interval or found.curves.cmd,
        )
        print(f"Faithfulness curves (MIB budgets): CPR {cpr}, CMD {cmd}")
    if found.faithfulness_interval is not None:
        print("(in brackets: 95% bootstrap intervals over the pairs)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="auto", help="auto, gpt2, smollm2-135m, random-gpt2-small, or a hub name"
    )
    parser.add_argument("--out", default="outputs/ioi", help="output folder")
    parser.add_argument("--n", type=int, default=32, help="IOI prompt pairs")
    parser.add_argument("--method", default="eap-ig-inputs")
    parser.add_argument("--steps", type=int, default=5, help="IG steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--edges", type=int, default=300, help="edges kept in the circuit (before pruning)")
    parser.add_argument("--no-curve", action="store_true", help="skip the MIB faithfulness curves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = build_model(args.model, args.device, getattr(torch, args.dtype))
    print(f"Loaded {model} in {time.perf_counter() - start:.1f} s")
    task = ioi_pairs(model, args.n, seed=args.seed)
    found = discover(
        model,
        task,
        method=args.method,
        ig_steps=args.steps,
        batch_size=args.batch_size,
        edges=args.edges,
        curves=not args.no_curve,
        out=args.out,
    )
    report(found, model)
    if is_gpt2_small(model):  # Wang et al.'s head classes are GPT-2 small's: recorded beside its summary
        summary = Path(args.out) / "summary.json"
        record = json.loads(summary.read_text())
        record["head_classes_wang_2022"] = head_class_overlap([h.name for h in found.heads])
        summary.write_text(json.dumps(record, indent=2))
    print(f"\nWrote {', '.join(str(f) for f in found.files)} ({time.perf_counter() - start:.0f} s total)")


def is_gpt2_small(model: HookedModel) -> bool:
    """GPT-2 small's shape (12 layers, 12 heads, d_model 768), where Wang et al.'s head names apply."""
    spec = model.spec
    return (spec.n_layers, spec.n_heads, spec.d_model) == (12, 12, 768)


if __name__ == "__main__":
    main()
