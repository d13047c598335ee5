"""The EAP-IG reference (hannamw/EAP-IG) timed on the shapes and pairs of scripts/benchmark.py.

Needs a checkout of EAP-IG (its `src/` folder is put on the path; nothing of it is part of this project) and
TransformerLens 3.x, the last series with `HookedTransformer`, which EAP-IG is written for (this project uses
TransformerLens 4.x). scripts/gpu_check.sh puts both on the path of this script's process alone:

    PYTHONPATH=.bundle/reference/site python scripts/eap_ig_reference.py --checkout ../EAP-IG \\
        --models gpt2-small-random --device cuda --dtype bfloat16 --n 64 --batch-size 8 --json ref.json

The `HookedTransformer` has the published shape with TransformerLens' own random initialisation (the speed
of a pass does not depend on the weights), set up as EAP-IG asks: split q/k/v inputs, per-head results, MLP
input hooks, grouped-query attention ungrouped. The pairs are the benchmark's random token pairs, handed to
EAP-IG as token tensors (its tokenisation step is replaced by one that passes them through). Timed: EAP,
EAP-IG-inputs, clean-corrupted (`attribute`), and `evaluate_graph` of 10 top-n circuits (1-10 % of edges),
with the same warm-up and best-of-repeats clock as the benchmark.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import torch
from clock import best_of, peak_gpu_mb
from shapes import SHAPES, random_config, random_token_pairs

METHODS = {"eap": "EAP", "eap-ig-inputs": "EAP-IG-inputs", "clean-corrupted": "clean-corrupted"}


def hooked_config(name: str, shape: str, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """TransformerLens 3 config arguments of shape `name`, read from its Hugging Face config."""
    hf = random_config(name, shape)
    common = dict(device=device, dtype=dtype, n_ctx=1024, original_architecture=type(hf).__name__)
    if name.startswith("gpt2"):
        return common | dict(
            n_layers=hf.n_layer,
            d_model=hf.n_embd,
            n_heads=hf.n_head,
            d_head=hf.n_embd // hf.n_head,
            d_mlp=hf.n_inner or 4 * hf.n_embd,
            d_vocab=hf.vocab_size,
            act_fn=hf.activation_function,
            normalization_type="LN",
            eps=hf.layer_norm_epsilon,
            positional_embedding_type="standard",
        )
    d_head = hf.hidden_size // hf.num_attention_heads
    return common | dict(
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_heads=hf.num_attention_heads,
        d_head=d_head,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_key_value_heads=hf.num_key_value_heads,
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        eps=hf.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=hf.rope_parameters["rope_theta"],
    )


def hooked_model(name: str, shape: str, device: str, dtype: torch.dtype) -> Any:
    """A randomly initialised `HookedTransformer` of shape `name`, configured as EAP-IG requires."""
    lens = importlib.import_module("transformer_lens")
    if not hasattr(lens, "HookedTransformer"):
        raise SystemExit(
            f"transformer_lens {lens.__version__} has no HookedTransformer: EAP-IG needs TransformerLens 3.x "
            "(scripts/device_bundle.sh puts it in .bundle/reference/site)"
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = lens.HookedTransformer(
            lens.HookedTransformerConfig(**hooked_config(name, shape, device, dtype))
        )
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    if model.cfg.n_key_value_heads is not None:
        model.set_ungroup_grouped_query_attention(True)
    return model.eval()


def pass_tokens_through(
    model: Any, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """EAP-IG's `tokenize_plus` for prompts that are already token ids (no padding: equal lengths)."""
    tokens = tokens.to(model.cfg.device)
    mask = torch.ones_like(tokens)
    return tokens, mask, mask.sum(1), tokens.shape[1]


def negative_logit_diff(
    logits: torch.Tensor,
    clean_logits: torch.Tensor,  # noqa: ARG001 (EAP-IG passes it to every metric)
    lengths: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """EAP-IG's metric signature: -(answer - wrong) logit at each prompt's last token, averaged."""
    last = logits[torch.arange(len(logits)), lengths - 1]
    labels = labels.to(last.device)
    return -(last.gather(1, labels[:, :1]) - last.gather(1, labels[:, 1:])).mean()


def on_the_cpu(eap_module: types.ModuleType) -> None:
    """EAP-IG allocates its score buffers on 'cuda' by name: on a CPU-only run (the smoke test), send those
    allocations to the CPU instead."""

    def zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)

    eap_module.torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch)} | {"zeros": zeros})  # type: ignore[attr-defined]


def run(name: str, args: argparse.Namespace) -> list[dict]:
    attribute_module = importlib.import_module("eap.attribute")
    evaluate_module = importlib.import_module("eap.evaluate")
    graph_module = importlib.import_module("eap.graph")
    for module in (attribute_module, evaluate_module):
        module.tokenize_plus = pass_tokens_through  # type: ignore[attr-defined]
    if not args.device.startswith("cuda"):
        on_the_cpu(attribute_module)
    model = hooked_model(name, args.shape, args.device, getattr(torch, args.dtype))
    clean, corrupted, answer, wrong = random_token_pairs(model.cfg.d_vocab, args.n)
    labels = torch.stack([answer, wrong], dim=1)
    batches = [
        (clean[i : i + args.batch_size], corrupted[i : i + args.batch_size], labels[i : i + args.batch_size])
        for i in range(0, args.n, args.batch_size)
    ]
    graph = graph_module.Graph.from_model(model)
    rows = []

    def row(label: str, seconds: float) -> None:
        rows.append(
            dict(
                model=name,
                method=f"EAP-IG reference: {label}",
                seconds=seconds,
                pairs=args.n,
                seconds_per_pair=seconds / args.n,
                edges=int(graph.real_edge_mask.sum()) if hasattr(graph, "real_edge_mask") else None,
                peak_gpu_mb=peak_gpu_mb(args.device),
            )
        )
        print(f"| {name} | {rows[-1]['method']} | {seconds:.2f} s | {args.n} | | |", flush=True)

    for method in args.methods:

        def go(method: str = method) -> None:
            attribute_module.attribute(
                model,
                graph,
                batches,
                negative_logit_diff,
                method=METHODS[method],
                ig_steps=args.steps if method == "eap-ig-inputs" else None,
                quiet=True,
            )

        row(method, best_of(go, args.repeats))
    n_edges = int(graph.real_edge_mask.sum())
    budgets = [max(1, n_edges * k // 100) for k in range(1, 11)]

    def evaluate() -> None:
        for n in budgets:
            graph.apply_topn(n)
            evaluate_module.evaluate_graph(model, graph, batches, negative_logit_diff, quiet=True)

    row("evaluate_graph, 10 circuits (1-10 % of edges)", best_of(evaluate, args.repeats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkout", required=True, help="a checkout of hannamw/EAP-IG")
    parser.add_argument("--models", nargs="+", default=["gpt2-small-random"], choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", default="published", choices=["published", "small"])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    source = Path(args.checkout) / "src"
    if not (source / "eap" / "attribute.py").exists():
        raise SystemExit(f"{args.checkout!r} is not a checkout of hannamw/EAP-IG (no src/eap/attribute.py)")
    sys.path.insert(0, str(source))
    rows = [row for name in args.models for row in run(name, args)]
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows), indent=1))


if __name__ == "__main__":
    main()
