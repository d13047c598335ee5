"""The GPU check: every entry point on the device, then the benchmark beside the EAP-IG reference.

Run by scripts/gpu_check.sh (which first installs the carried bundle); each step is a subprocess with its
own time limit, so one that fails or runs out of time leaves the others' results. Writes to `--out`
(the device tool's $OUT): gpu_check.json (everything), gpu_check.md (the tables), one log per step.

1. tests/test_virtual_device.py with `CIRCUITS_TEST_DEVICE` set to the device: the stand-in device's tests
   on the real one (every entry point in float32 and bfloat16, GPT-2's layout, layers split over the GPU
   and the CPU, the CLI), results equal to the CPU's to a tolerance; on the CPU the stand-in itself.
2. scripts/benchmark.py, edges section, per model: plain passes, EAP, EAP-IG-inputs (m = 5),
   clean-corrupted, exact (node level, on a subset of pairs), evaluate_many of 10 circuits; peak GPU memory.
3. With --eap-ig (or a bundled .bundle/EAP-IG): scripts/eap_ig_reference.py on the same shapes, pairs,
   batch size, dtype and card, and a side-by-side table.

    python scripts/gpu_check.py --device cuda --out $OUT
    python scripts/gpu_check.py --device cpu --shape small --tests quick --out /tmp/check   # the CI run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = "tests/test_virtual_device.py"
QUICK_TESTS = "test_every_entry_point_runs_on_another_device_with_the_cpu_results and eap-ig-inputs-dtype0"


@dataclass(frozen=True)
class Plan:
    """What the benchmark runs on one model."""

    model: str
    n: int
    batch_size: int
    exact_n: int


# Published shapes on a GPU: EAP-IG's notebooks use GPT-2 small (1,000 pairs) and Llama-3-8B (498 pairs,
# batch 10); these sizes keep the whole check within a few minutes of an H100.
PLANS = {
    "published": [
        Plan("gpt2-small-random", n=256, batch_size=32, exact_n=32),
        Plan("llama-3.1-8b-random", n=64, batch_size=8, exact_n=8),
    ],
    "small": [
        Plan("gpt2-small-random", n=8, batch_size=4, exact_n=4),
        Plan("llama-3.1-8b-random", n=8, batch_size=4, exact_n=4),
    ],
}
METHODS = ["eap", "eap-ig-inputs", "clean-corrupted"]
SIDE_BY_SIDE = {  # our row label -> the reference's
    "eap": "EAP-IG reference: eap",
    "eap-ig-inputs": "EAP-IG reference: eap-ig-inputs",
    "clean-corrupted": "EAP-IG reference: clean-corrupted",
    "evaluate_many, 10 circuits (1-10 % of edges)": (
        "EAP-IG reference: evaluate_graph, 10 circuits (1-10 % of edges)"
    ),
}


@dataclass
class Step:
    name: str
    command: list[str]
    seconds: float = 0.0
    returncode: int | None = None  # None: not finished within its time limit
    summary: str = ""
    results: dict = field(default_factory=dict)


DEADLINE = [float("inf")]  # perf_counter time by which every step must have ended (--budget)


def run_step(step: Step, out: Path, timeout: float, env: dict[str, str] | None = None) -> Step:
    """Run `step.command` in the repository, its output to out/<name>.log, within `timeout` and what is
    left of the budget; never raises."""
    log = out / f"{step.name}.log"
    start = time.perf_counter()
    timeout = min(timeout, DEADLINE[0] - start)
    if timeout < 10:
        step.summary = "skipped: the time budget is spent"
        print(f"== {step.name}: {step.summary}", flush=True)
        return step
    print(f"== {step.name}: {' '.join(step.command)}", flush=True)
    with log.open("w") as handle:
        try:
            done = subprocess.run(
                step.command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, env=env
            )
            step.returncode = done.returncode
        except subprocess.TimeoutExpired:
            step.returncode = None
    step.seconds = time.perf_counter() - start
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    state = "timed out" if step.returncode is None else f"rc {step.returncode}"
    step.summary = f"{state} in {step.seconds:.0f} s: {tail[0][:300]}"
    print(f"   {step.summary}", flush=True)
    return step


def environment(device: str) -> dict:
    import torch
    import transformers

    found = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        cuda=torch.version.cuda,
        device=torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU",
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
    )
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        found["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return found


def tests_step(args: argparse.Namespace, out: Path) -> Step:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TESTS]
    if args.tests == "quick":
        command += ["-k", QUICK_TESTS]
    env = dict(os.environ)
    if args.device != "cpu":  # on the CPU the virtual device stands in
        env["CIRCUITS_TEST_DEVICE"] = args.device
    step = run_step(Step("tests", command), out, args.test_timeout, env)
    counts = re.findall(r"(\d+) (passed|failed|error|errors|skipped)", step.summary)
    step.results = {kind: int(n) for n, kind in counts}
    return step


def benchmark_step(plan: Plan, args: argparse.Namespace, out: Path) -> Step:
    rows = out / f"benchmark-{plan.model}.json"
    command = [sys.executable, "scripts/benchmark.py", "--sections", "edges", "--models", plan.model]
    command += ["--methods", *METHODS, "exact", "--device", args.device, "--dtype", args.dtype]
    command += ["--shape", args.shape, "--n", str(plan.n), "--batch-size", str(plan.batch_size)]
    command += ["--exact-n", str(plan.exact_n), "--repeats", "1", "--json", str(rows)]
    step = run_step(Step(f"benchmark-{plan.model}", command), out, args.benchmark_timeout)
    if rows.exists():
        step.results = json.loads(rows.read_text())
        rows.unlink()  # folded into gpu_check.json (the device tool brings back at most 8 files)
    return step


def reference_step(plan: Plan, args: argparse.Namespace, out: Path) -> Step:
    rows = out / f"reference-{plan.model}.json"
    command = [
        sys.executable,
        "scripts/eap_ig_reference.py",
        "--checkout",
        args.eap_ig,
        "--models",
        plan.model,
    ]
    command += ["--methods", *METHODS, "--device", args.device, "--dtype", args.dtype, "--shape", args.shape]
    command += ["--n", str(plan.n), "--batch-size", str(plan.batch_size), "--json", str(rows)]
    env = dict(os.environ)
    if args.reference_site:  # TransformerLens 3 ahead of the 4.x this project uses, for this process alone
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.reference_site, env.get("PYTHONPATH")]))
    step = run_step(Step(f"reference-{plan.model}", command), out, args.reference_timeout, env)
    if rows.exists():
        step.results = json.loads(rows.read_text())
        rows.unlink()
    return step


def markdown(env: dict, steps: list[Step]) -> str:
    lines = ["# GPU check", "", ", ".join(f"{k} {v}" for k, v in env.items() if k != "nvidia_smi"), ""]
    lines += ["| step | result |", "|---|---|"] + [f"| {s.name} | {s.summary} |" for s in steps]
    ours = {
        (r["model"], r["method"]): r
        for s in steps
        if s.name.startswith("bench")
        for r in s.results.get("rows", [])
    }
    reference = {
        (r["model"], r["method"]): r
        for s in steps
        if s.name.startswith("ref")
        for r in s.results.get("rows", [])
    }
    lines += [
        "",
        "| model | method | pairs | wall time | s / pair | ratio to pass-count limit | peak GPU MB |",
    ]
    lines += ["|---|---|---|---|---|---|---|"]
    for r in ours.values():
        gpu = "" if r.get("peak_gpu_mb") is None else f"{r['peak_gpu_mb']:.0f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['pairs']} | {r['seconds']:.2f} s "
            f"| {r['seconds_per_pair']:.4f} | {r['limit']} | {gpu} |"
        )
    if reference:
        lines += [
            "",
            "| model | method | this package | EAP-IG reference | speed-up |",
            "|---|---|---|---|---|",
        ]
        for (model, method), r in ours.items():
            theirs = reference.get((model, SIDE_BY_SIDE.get(method, "")))
            if theirs is not None:
                lines.append(
                    f"| {model} | {method} | {r['seconds']:.2f} s | {theirs['seconds']:.2f} s "
                    f"| {theirs['seconds'] / r['seconds']:.2f}x |"
                )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", default="published", choices=list(PLANS))
    parser.add_argument("--tests", default="all", choices=["all", "quick", "none"])
    parser.add_argument("--models", nargs="+", help="a subset of the plan's models")
    parser.add_argument("--eap-ig", help="a checkout of hannamw/EAP-IG: also time the reference")
    parser.add_argument("--reference-site", help="where TransformerLens 3 is installed for the reference")
    parser.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu_check")
    parser.add_argument("--test-timeout", type=float, default=240)
    parser.add_argument("--benchmark-timeout", type=float, default=200)
    parser.add_argument("--reference-timeout", type=float, default=150)
    parser.add_argument("--budget", type=float, default=540, help="seconds for all steps together")
    args = parser.parse_args()
    DEADLINE[0] = time.perf_counter() + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    print(env, flush=True)
    steps = [] if args.tests == "none" else [tests_step(args, out)]
    plans = [p for p in PLANS[args.shape] if not args.models or p.model in args.models]
    for plan in plans:
        steps.append(benchmark_step(plan, args, out))
        if args.eap_ig:
            steps.append(reference_step(plan, args, out))
    (out / "gpu_check.json").write_text(
        json.dumps(dict(environment=env, steps=[asdict(s) for s in steps]), indent=1)
    )
    (out / "gpu_check.md").write_text(markdown(env, steps))
    print(markdown(env, steps))
    return 0 if all(s.returncode == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
