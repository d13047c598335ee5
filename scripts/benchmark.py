"""Speed of each attribution method against its pass-count limit, measured in one run.

For every model and method: wall time of `attribute(...)` over all pairs, divided by the method's limit,
i.e. the time plain Hugging Face passes of the same model on the same batches take, counted as the method
needs them (EAP: 1 forward + 1 forward/backward per batch; EAP-IG-inputs with m steps: 2 forwards + m
forward/backward; clean-corrupted: 2 forward/backward). A ratio of 1.0 means no overhead at all. The
plain passes unembed every position; the methods, with a metric reading only the last position, unembed
that one only (an extra EAP row shows the ratio with every position unembedded).

    python scripts/benchmark.py                  # SmolLM2 IOI (32 pairs, batch 8) + GPT-2-small-shaped model
    python scripts/benchmark.py --models smollm2 --methods eap eap-ig-inputs
    python scripts/benchmark.py --sections selection neurons   # pruning speed; neuron IG cached vs full
    python scripts/benchmark.py --sections head-inputs --n 16   # q/k/v pull-backs: closed form vs autograd
    python scripts/benchmark.py --sections memory --lengths 128 512   # peak RSS against prompt length
    python scripts/benchmark.py --sections memory --lengths 2048 --max-memory 8   # within a budget
    python scripts/benchmark.py --device cuda --dtype bfloat16 --sections edges \
        --models smollm2 qwen2.5-0.5b-random llama-3.1-8b-random \
        --methods eap eap-ig-inputs clean-corrupted exact
    python scripts/benchmark.py --shape small --models llama-3.1-8b-random --n 4   # tiny shapes, same rows
    python scripts/benchmark.py --sections edges --exact-n 8 --json rows.json   # exact on 8 pairs; JSON too

`--device cuda` synchronises before each clock reading and reports peak GPU memory; `exact` is timed at
node level, and every model also gets one `evaluate_many` of 10 circuits (no pass-count limit for either).
scripts/gpu_check.sh runs the edges section on a GPU beside the EAP-IG reference
(scripts/eap_ig_reference.py).

Also times selection + pruning on Llama-3-8B-sized graphs and neuron IG (cached one-position path against
the full-sequence path) on SmolLM2 with MemoTrap prompts.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from circuits_tasks import ioi_pairs
from circuits_tasks.context import first_token, memotrap
from circuits_tasks.paths import shared_data
from clock import best_of, peak_gpu_mb
from shapes import PAIR_LENGTH, SHAPES, random_hf, random_token_pairs

from circuits import Graph, load_model
from circuits.attribution import METHODS, MemoryPlan, ScoringOptions, attribute, estimate_bytes, plan_memory
from circuits.attribution.methods import MethodName
from circuits.cli import DTYPES
from circuits.data import PromptPairs
from circuits.evaluation import evaluate_many
from circuits.metrics import Metric, get_metric, logit_diff, reads_last_position
from circuits.models.hooked import HookedModel, ModelSpec
from circuits.models.plain import plain_model
from circuits.neurons import last_activations, neuron_ig
from circuits.testing import tiny_tokenizer


def random_model(
    name: str, shape: str = "published", device: str = "cpu", dtype: torch.dtype = torch.float32
) -> HookedModel:
    """A model of a published shape with random weights (the tiny tokenizer: the vocabulary stays)."""
    return load_model(random_hf(name, shape, device), tiny_tokenizer(), device=device, dtype=dtype)


def random_pairs(model: HookedModel, n: int, length: int = PAIR_LENGTH) -> PromptPairs:
    clean, corrupted, answer, wrong = random_token_pairs(model.d_vocab, n, length)
    return PromptPairs(clean, corrupted, torch.full((n,), length), answer, wrong)


def plain_pass_times(
    model: HookedModel, pairs: PromptPairs, batch_size: int, repeats: int
) -> tuple[float, float]:
    """Seconds for one plain HF forward and one forward+backward over all batches (best of `repeats`)."""
    hf = plain_model(model)
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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record(name: str, label: str, seconds: float, n: int, limit: str, device: str, **extra: Any) -> dict:
    """One benchmark row, printed as markdown as soon as it is measured (see `markdown_row`)."""
    row = dict(model=name, method=label, seconds=seconds, pairs=n, seconds_per_pair=seconds / n, limit=limit)
    row |= dict(peak_rss_mb=peak_rss_mb(), peak_gpu_mb=peak_gpu_mb(device)) | extra
    print(markdown_row(row), flush=True)
    return row


def markdown_row(row: dict) -> str:
    memory = f"{row['peak_rss_mb']:.0f} MB" if row.get("peak_rss_mb") is not None else ""
    if row.get("peak_gpu_mb") is not None:
        memory += f"; GPU {row['peak_gpu_mb']:.0f} MB"
    return (
        f"| {row['model']} | {row['method']} | {row['seconds']:.2f} s | {row['pairs']} | {row['limit']} "
        f"| {memory} |"
    )


MARKDOWN_HEADER = (
    "| model | method | wall time | pairs | ratio to pass-count limit | peak memory |\n"
    "|---|---|---|---|---|---|"
)


def run(name: str, model: HookedModel, pairs: PromptPairs, methods: list[MethodName], args) -> list[dict]:
    """Plain passes, each method's `attribute` and one `evaluate_many` of 10 circuits on `pairs`; exact
    patching (node level) on the first `args.exact_n` pairs."""
    graph = Graph.from_model(model)
    n = len(pairs)
    t_f, t_fb = plain_pass_times(model, pairs, args.batch_size, args.repeats)
    rows = [
        record(name, "plain forward", t_f, n, "", args.device),
        record(name, "plain forward+backward", t_fb, n, "", args.device),
    ]
    runs: list[tuple[MethodName, str, str | Metric]] = [(method, method, "logit_diff") for method in methods]
    if "eap" in methods:  # the same, the metric seen as an opaque callable: every position unembedded
        runs.append(("eap", "eap (all positions unembedded)", every_position_logit_diff))
    for method, label, metric in runs:
        count = METHODS[method].pass_count(args.steps, model.spec.n_layers)
        level = "node" if method == "exact" else "edge"  # exact edge patching: one pass per edge
        subset = pairs[: args.exact_n] if method == "exact" and args.exact_n else pairs

        def go(method: MethodName = method, metric=metric, level=level, subset=subset) -> None:
            attribute(
                model,
                graph,
                subset,
                metric=metric,
                method=method,
                ig_steps=args.steps,
                batch_size=args.batch_size,
                level=level,
                quiet=True,
            )

        seconds = best_of(go, args.repeats)
        if count is None:
            limit = f"(node level: {graph.n_sources} patched runs per batch)"
        else:
            forwards, fbs = count
            limit = f"{seconds / (forwards * t_f + fbs * t_fb):.2f}x ({forwards} fwd + {fbs} fwd/bwd)"
        label = f"{label} (node level)" if level == "node" else label
        rows.append(record(name, label, seconds, len(subset), limit, args.device))
    if graph.scores.abs().sum() == 0:  # circuits need scores: take EAP's
        attribute(model, graph, pairs, method="eap", batch_size=args.batch_size, quiet=True)
    circuits = [graph.top_n(max(1, graph.n_edges * k // 100)) for k in range(1, 11)]
    seconds = best_of(lambda: evaluate_many(model, circuits, pairs, batch_size=args.batch_size), args.repeats)
    ratio = seconds / (t_f * (2 + len(circuits)))  # clean + corrupted + one ablated forward per circuit
    label = "evaluate_many, 10 circuits (1-10 % of edges)"
    rows.append(record(name, label, seconds, n, f"{ratio:.2f}x (12 fwd)", args.device))
    return rows


def every_position_logit_diff(logits, pairs, clean_logits=None):
    """`logit_diff` without its `last_position` mark: every position is unembedded, as in plain passes."""
    return logit_diff(logits, pairs, clean_logits)


def selection_rows() -> None:
    """Selecting and pruning on Llama-3-8B-sized graphs built from a config (no weights)."""
    print("\n| graph | edges | top_n + prune (n = 1%) | threshold + prune | greedy (n = 0.1%) |")
    print("|---|---|---|---|---|")
    for label, kv in [("Llama-3-8B (GQA: k/v per kv head)", 8), ("Llama-3-8B, k/v per query head", 32)]:
        spec = ModelSpec(n_layers=32, n_heads=32, n_kv_heads=kv, d_model=4096, d_head=128, d_mlp=14336)
        graph = Graph(spec)
        graph.scores = (
            torch.randn(graph.valid.shape, generator=torch.Generator().manual_seed(0)) * graph.valid
        )
        n = graph.n_edges // 100
        t_top = best_of(lambda: graph.top_n(n), 3)  # noqa: B023 (called before the loop moves on)
        t_threshold = best_of(lambda: graph.threshold(2.5), 3)  # noqa: B023
        t_greedy = best_of(lambda: graph.greedy(graph.n_edges // 1000), 1)  # noqa: B023
        print(f"| {label} | {graph.n_edges:,} | {t_top:.3f} s | {t_threshold:.3f} s | {t_greedy:.3f} s |")


def head_input_rows(n: int, batch_size: int, steps: int, repeats: int) -> None:
    """The per-head q/k/v pull-back in closed form against the generic path (autograd through each head's
    input recomputed from its own copy of the residual, `HookedModel.closed_form_pullbacks = False`): on
    SmolLM2 (the slice shortcut applies) and on a random OLMo-2 of SmolLM2's shape (q/k norms over all
    heads: the closed form adds shared rank-one terms). Same scores either way (max difference shown)."""
    smollm2 = load_model("smollm2-135m")
    olmo_config = transformers.Olmo2Config(
        vocab_size=len(smollm2.tokenizer),
        hidden_size=smollm2.spec.d_model,
        intermediate_size=smollm2.spec.d_mlp,
        num_hidden_layers=smollm2.spec.n_layers,
        num_attention_heads=smollm2.spec.n_heads,
        num_key_value_heads=smollm2.spec.n_kv_heads,
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    olmo = load_model(transformers.Olmo2ForCausalLM(olmo_config).eval(), smollm2.tokenizer)
    print("\n| model | method | closed form | generic (autograd per head) | generic / closed | max |diff| |")
    print("|---|---|---|---|---|---|")
    for label, model in [("SmolLM2-135M", smollm2), ("OLMo-2, SmolLM2's shape, random", olmo)]:
        pairs = ioi_pairs(model, n).pairs
        graph = Graph.from_model(model)
        methods: list[MethodName] = ["eap", "eap-ig-inputs"]
        for method in methods:
            times, scores = [], []
            for closed in (True, False):
                model.closed_form_pullbacks = closed

                def go(model: HookedModel = model, graph: Graph = graph, pairs=pairs, method=method) -> Any:
                    return attribute(
                        model, graph, pairs, method=method, ig_steps=steps, batch_size=batch_size, quiet=True
                    ).edge_scores

                times.append(best_of(go, repeats))
                scores.append(go())
            model.closed_form_pullbacks = True
            diff = float((scores[0] - scores[1]).abs().max())
            print(
                f"| {label} | {method} | {times[0]:.2f} s | {times[1]:.2f} s | {times[1] / times[0]:.2f}x | "
                f"{diff:.1e} |"
            )


def neuron_rows(n_prompts: int, steps: int) -> None:
    """Neuron IG on SmolLM2 / MemoTrap: the cached one-position path against the full-sequence path."""
    model = load_model("smollm2-135m")
    examples = memotrap(shared_data("ircan", "data", "MemoTrap", "memo-trap_classification_dev.jsonl"))[
        :n_prompts
    ]
    prompts = [e.with_context for e in examples]
    targets = [first_token(model, e) for e in examples]
    baseline = last_activations(model, [e.without_context for e in examples])
    times = {}
    for implementation in ("cached", "full"):
        # warm-up: builds the plain models the paths share the bridge's weights with (once per model)
        neuron_ig(
            model, prompts[:1], targets[:1], steps=1, layers=[0], implementation=implementation, quiet=True
        )
        start = time.perf_counter()
        neuron_ig(
            model, prompts, targets, baseline=baseline, steps=steps, implementation=implementation, quiet=True
        )
        times[implementation] = (time.perf_counter() - start) / n_prompts
    lengths = [len(ids) for ids in model.to_ids(prompts)]
    print(
        f"\nneuron IG, SmolLM2, {n_prompts} MemoTrap prompts ({min(lengths)}-{max(lengths)} tokens), "
        f"m = {steps}"
    )
    print("| implementation | seconds per prompt |\n|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.2f} |")
    print(f"speed-up: {times['full'] / times['cached']:.1f}x; peak RSS {peak_rss_mb():.0f} MB")


def memory_rows(lengths: list[int], steps: int, max_rows: int, max_memory: float | None) -> None:
    """Peak RSS and time of EAP-IG-inputs on SmolLM2 for one pair of each length, each in a fresh process
    (the RSS high-water mark is per process)."""
    budget = "" if max_memory is None else f", max_memory {max_memory} GiB"
    print(
        f"\n| prompt tokens | eap-ig-inputs (m = {steps}, max_rows {max_rows}{budget}), 1 pair | per token "
        "| peak RSS | settings |"
    )
    print("|---|---|---|---|---|")
    for length in lengths:
        command = [sys.executable, __file__, "--sections", "memory-one", "--length", str(length)]
        command += ["--max-rows", str(max_rows)]
        command += [] if max_memory is None else ["--max-memory", str(max_memory)]
        done = subprocess.run([*command, "--steps", str(steps)], capture_output=True, text=True)
        print(
            done.stdout.strip().splitlines()[-1]
            if done.returncode == 0
            else f"| {length} | failed: "
            f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode} | | | |"
        )


def memory_one(length: int, steps: int, max_rows: int, max_memory: float | None) -> None:
    model = load_model("smollm2-135m")
    pairs = random_pairs(model, 1, length)
    graph = Graph.from_model(model)
    last = reads_last_position(get_metric("logit_diff"))
    options = ScoringOptions("eap-ig-inputs", ig_steps=steps, batch_size=1, max_rows=max_rows)
    plan = (
        MemoryPlan(1, max_rows, False, estimate_bytes(model, graph, options, length, last))
        if max_memory is None
        else plan_memory(model, graph, options.with_settings(max_memory=max_memory), length, last)
    )
    start = time.perf_counter()
    attribute(
        model,
        graph,
        pairs,
        method="eap-ig-inputs",
        ig_steps=steps,
        batch_size=1,
        max_rows=max_rows,
        max_memory=max_memory,
        quiet=True,
    )
    seconds = time.perf_counter() - start
    print(
        f"| {length} | {seconds:.1f} s | {seconds / length * 1000:.1f} ms | {peak_rss_mb() / 1024:.2f} GB "
        f"| {plan} |"
    )


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "gpt2-small-random"])
    parser.add_argument("--methods", nargs="+", default=["eap", "eap-ig-inputs", "clean-corrupted"])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sections", nargs="+", default=["edges", "selection", "neurons"])
    parser.add_argument("--neuron-prompts", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--shape", default="published", choices=["published", "small"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512], help="memory section")
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-rows", type=int, default=64, help="memory section: rows per pass")
    parser.add_argument("--max-memory", type=float, help="memory section: attribute's max_memory (GiB)")
    parser.add_argument("--exact-n", type=int, help="exact patching on the first N pairs only (default: all)")
    parser.add_argument("--json", help="edges section: also write the environment and rows to this file")
    args = parser.parse_args()
    if "memory-one" in args.sections:
        memory_one(args.length, args.steps, args.max_rows, args.max_memory)
        return
    torch.manual_seed(0)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    environment = dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        processor=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        device=device,
        dtype=args.dtype,
        shape=args.shape,
        n=args.n,
        batch_size=args.batch_size,
        ig_steps=args.steps,
        exact_n=args.exact_n,
    )
    print(", ".join(f"{key} {value}" for key, value in environment.items()))
    if "selection" in args.sections:
        selection_rows()
    if "neurons" in args.sections:
        neuron_rows(args.neuron_prompts, 20)
    if "head-inputs" in args.sections:
        head_input_rows(args.n, args.batch_size, args.steps, args.repeats)
    if "memory" in args.sections:
        memory_rows(args.lengths, args.steps, args.max_rows, args.max_memory)
    if "edges" not in args.sections:
        return
    print(f"\n{MARKDOWN_HEADER}")
    rows = []
    for name in args.models:
        if name == "smollm2":
            model = load_model("smollm2-135m", device=args.device, dtype=getattr(torch, args.dtype))
            pairs = ioi_pairs(model, args.n).pairs
        elif name in SHAPES:
            model = random_model(name, args.shape, args.device, getattr(torch, args.dtype))
            pairs = random_pairs(model, args.n)
        else:
            raise SystemExit(f"unknown model {name!r}: choose smollm2 or one of {', '.join(SHAPES)}")
        rows += run(name, model, pairs, args.methods, args)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(environment=environment, rows=rows), indent=1))


if __name__ == "__main__":
    main()
