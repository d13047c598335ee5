"""Speed of each attribution method against its pass-count limit, measured in one run.

For every model and method: wall time of `attribute(...)` over all pairs, divided by the method's limit,
i.e. the time plain Hugging Face passes of the same model on the same batches take, counted as the method
needs them (EAP: 1 forward + 1 forward/backward per batch; EAP-IG-inputs with m steps: 2 forwards + m
forward/backward; clean-corrupted: 2 forward/backward). A ratio of 1.0 means no overhead at all.

    python scripts/benchmark.py                  # SmolLM2 IOI (32 pairs, batch 8) + GPT-2-small-shaped model
    python scripts/benchmark.py --models smollm2 --methods eap eap-ig-inputs
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from circuits import Graph, load_model
from circuits.attribution import attribute
from circuits.data import PromptPairs
from circuits.metrics import logit_diff
from circuits.models.hooked import HookedModel
from circuits.testing import tiny_tokenizer
from tasks import ioi_pairs

PASSES = {  # (forwards, forward+backwards) per batch
    "eap": lambda m: (1, 1),
    "eap-ig-inputs": lambda m: (2, m),
    "clean-corrupted": lambda m: (0, 2),
    "eap-ig-activations": lambda m: (2, 0),  # plus m(2L+1) forward/backward, added below
}


def gpt2_small_random() -> HookedModel:
    cfg = GPT2Config()  # GPT-2 small: 12 layers, 12 heads, d_model 768, vocab 50257
    torch.manual_seed(0)
    return load_model(GPT2LMHeadModel(cfg).eval(), tiny_tokenizer())


def random_pairs(model: HookedModel, n: int, length: int) -> PromptPairs:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.d_vocab, (n, length), generator=gen)
    corrupted = clean.clone()
    corrupted[:, length // 2] = torch.randint(0, model.d_vocab, (n,), generator=gen)
    answer = torch.randint(0, model.d_vocab, (n,), generator=gen)
    return PromptPairs(clean, corrupted, torch.full((n,), length), answer, (answer + 1) % model.d_vocab)


def plain_pass_times(
    model: HookedModel, pairs: PromptPairs, batch_size: int, repeats: int
) -> tuple[float, float]:
    """Seconds for one plain HF forward and one forward+backward over all batches (best of `repeats`)."""
    hf = model.bridge.original_model
    embed = hf.get_input_embeddings()

    def forward() -> None:
        for batch in pairs.batches(batch_size):
            with torch.no_grad():
                hf(input_ids=batch.clean, attention_mask=batch.attention_mask)

    def forward_backward() -> None:
        for batch in pairs.batches(batch_size):
            emb = embed(batch.clean).detach().requires_grad_(True)
            logits = hf(inputs_embeds=emb, attention_mask=batch.attention_mask).logits
            logit_diff(logits, batch).sum().backward()

    return best_of(forward, repeats), best_of(forward_backward, repeats)


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(name: str, model: HookedModel, pairs: PromptPairs, methods: list[str], args) -> list[str]:
    graph = Graph.from_model(model)
    t_f, t_fb = plain_pass_times(model, pairs, args.batch_size, args.repeats)
    rows = [
        f"| {name} | plain forward | {t_f:.2f} s | | |",
        f"| {name} | plain forward+backward | {t_fb:.2f} s | | |",
    ]
    for method in methods:
        forwards, fbs = PASSES[method](args.steps)
        if method == "eap-ig-activations":
            fbs = args.steps * (2 * model.spec.n_layers + 1)
        limit = forwards * t_f + fbs * t_fb

        def go(method: str = method) -> None:
            attribute(
                model,
                graph,
                pairs,
                method=method,
                ig_steps=args.steps,
                batch_size=args.batch_size,
                quiet=True,
            )

        seconds = best_of(go, args.repeats)
        rows.append(
            f"| {name} | {method} | {seconds:.2f} s | {seconds / limit:.2f}x "
            f"({forwards} fwd + {fbs} fwd/bwd) | {peak_rss_mb():.0f} MB |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "gpt2-small-random"])
    parser.add_argument("--methods", nargs="+", default=["eap", "eap-ig-inputs", "clean-corrupted"])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{platform.processor() or platform.machine()},"
        f" {torch.get_num_threads()} threads; n={args.n}, batch {args.batch_size}, IG steps {args.steps}"
    )
    print("| model | method | wall time | ratio to pass-count limit | peak RSS (process) |")
    print("|---|---|---|---|---|")
    for name in args.models:
        if name == "smollm2":
            model = load_model("smollm2-135m")
            pairs = ioi_pairs(model, args.n).pairs
        elif name == "gpt2-small-random":
            model = gpt2_small_random()
            pairs = random_pairs(model, args.n, 16)
        else:
            raise SystemExit(f"unknown model {name!r}: choose smollm2 or gpt2-small-random")
        for row in run(name, model, pairs, args.methods, args)[:2]:
            print(row)


if __name__ == "__main__":
    main()
