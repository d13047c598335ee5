"""Position-aware EAP here against PEAP's own code (technion-cs-nlp/PEAP), same pairs, same weights, same
CPU, one run each, side by side.

GPT-2 small's shape with random weights (seed 0) and the tiny tokenizer (no hub needed); IOI pairs with
the generator's spans. This script exports the weights, tokenizer and pairs (with PEAP's span columns),
times `attribute(model, SpanGraph, pairs, method="eap")` here, then runs `scripts/peap_runner.py` under
--peap-python (an environment with PEAP's dependencies: TransformerLens 2.x, transformers 4.x) and
compares: time, and the scores of the edges both define the same way (span edges; value crossing edges,
where PEAP's sum of one-position patches is exactly the whole-span patch; key crossing edges differ by
definition, so only their correlation is shown).

    python scripts/peap_comparison.py --peap path/to/PEAP --peap-python path/to/env/bin/python --n 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
from circuits_tasks import ioi_pairs
from transformers import GPT2Config, GPT2LMHeadModel

from circuits import attribute, load_model
from circuits.span_graph import SpanGraph
from circuits.spans import Spans
from circuits.testing import tiny_tokenizer

LENGTH = "length"  # PEAP's last span column: the whole prompt


def export(folder: Path, model, hf: GPT2LMHeadModel, pairs, spans: Spans) -> None:
    """weights.pt, config.json, tokenizer/ and pairs.json (PEAP's columns: prompt, each span's first
    position, `length`, correct_token, wrong_token)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(hf.state_dict(), folder / "weights.pt")
    (folder / "config.json").write_text(json.dumps(hf.config.to_dict()))
    model.tokenizer.save_pretrained(folder / "tokenizer")
    clean, corrupted = [], []
    for row, (text, other) in enumerate(pairs.texts):
        index = spans.index[row]
        length = int((index >= 0).sum())
        starts: dict[str, int] = {}
        for s, name in reversed(list(enumerate(spans.names))):  # an empty span starts where the next does
            inside = (index == s).nonzero()[:, 0]
            starts[name] = int(inside[0]) if inside.numel() else starts.get(spans.names[s + 1], length)
        answer = model.tokenizer.decode([int(pairs.answer[row])])
        wrong = model.tokenizer.decode([int(pairs.distractor[row])])
        base = {"length": length, "correct_token": answer, "wrong_token": wrong, **starts}
        clean.append({"prompt": text, **base})
        corrupted.append({"prompt": other, **base})
    data = {
        "spans": [*spans.names, LENGTH],
        "prepend_bos": bool(model.prepend_bos),
        "clean": clean,
        "corrupted": corrupted,
    }
    (folder / "pairs.json").write_text(json.dumps(data))


def compare(graph: SpanGraph, peap: dict, names: list[str]) -> dict[str, float]:
    """Largest gap between PEAP's mean "sum" scores and ours, relative to our largest score, for span
    edges and value crossing edges; the correlation of key crossing edges."""
    g = graph.graph

    def source(kind: str, layer: int, head: int | None) -> str:
        return {"r": "input", "h": f"a{layer}.h{head}", "m": f"m{layer}"}[kind]

    pairs: dict[str, list[tuple[float, float]]] = {"span": [], "v": [], "k": []}  # (ours, theirs)
    for edge in peap["edges"]:
        (up, ul, uh), (down, dl, dh) = edge["up"], edge["down"]
        if edge["crossing"]:
            if up not in ("k", "v") or down != "h":
                continue  # PEAP's query crossing edges have no counterpart here
            a, b = (names.index(s) for s in edge["spans"])
            ours = graph.crossing_scores[a, b, g.src_index[f"a{ul}.h{uh}"], "kv".index(up)]
            pairs[up].append((float(ours), edge["sum"][0]))
            continue
        src = source(up, ul, uh)
        dst = {"r": "logits", "m": f"m{dl}"}.get(down, f"a{dl}.h{dh}<{down}>")
        if src not in g.src_index or dst not in g.dst_index:
            continue
        u, v = g.src_index[src], g.dst_index[dst]
        for s in range(len(names)):
            pairs["span"].append((float(graph.scores[s, u, v]), edge["sum"][s]))
    out: dict[str, float] = {}
    for kind in ("span", "v"):
        ours, theirs = (torch.tensor(column, dtype=torch.float64) for column in zip(*pairs[kind]))
        out[f"{kind} edges compared"] = len(pairs[kind])
        out[f"{kind} max gap / max |score|"] = float((ours - theirs).abs().max() / ours.abs().max())
    ours, theirs = (torch.tensor(column, dtype=torch.float64) for column in zip(*pairs["k"]))
    out["k crossing correlation"] = float(torch.corrcoef(torch.stack([ours, theirs]))[0, 1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peap", required=True, help="a checkout of technion-cs-nlp/PEAP")
    parser.add_argument(
        "--peap-python", required=True, help="python of an environment with PEAP's dependencies"
    )
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 shape: layers (GPT-2 small: 12)")
    parser.add_argument("--heads", type=int, default=12, help="GPT-2 shape: heads (GPT-2 small: 12)")
    parser.add_argument("--width", type=int, default=768, help="GPT-2 shape: d_model (GPT-2 small: 768)")
    parser.add_argument("--out", default="outputs/peap")
    args = parser.parse_args()
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_head=args.heads, n_embd=args.width)).eval()
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    model = load_model(hf, tiny_tokenizer())
    hf.load_state_dict(weights)
    task = ioi_pairs(model, args.n, seed=0)
    spans = task.spans
    assert spans is not None
    pairs = spans.attach(task.pairs)
    folder = Path(args.out)
    export(folder, model, hf, pairs, spans)

    graph = SpanGraph.from_model(model, spans)
    start = time.perf_counter()
    attribute(model, graph, pairs, method="eap", batch_size=args.batch_size, quiet=True)
    ours = time.perf_counter() - start
    print(f"here: {ours:.1f} s for {len(pairs)} pairs (batch {args.batch_size}), span and crossing edges")
    runner = Path(__file__).with_name("peap_runner.py")
    subprocess.run([args.peap_python, str(runner), "--peap", args.peap, "--folder", str(folder)], check=True)
    peap = json.loads((folder / "peap.json").read_text())
    agreement = compare(graph, peap, list(spans.names))
    shape = {"layers": args.layers, "heads": args.heads, "width": args.width}
    summary = {
        "shape": shape,
        "pairs": len(pairs),
        "seconds": {"here": ours, "peap": peap["seconds"]},
        **agreement,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
