"""IRCAN on the embedded model: fit context neurons on a dev split, choose (h, beta) on dev, report test.

Rows: the original model, IRCAN (its h most frequent context neurons scaled by beta) and a random-neuron
control with the same per-layer counts and beta. Data are read from the shared data folder (or --data).

    python scripts/ircan.py --dataset memotrap --fit 100 --out outputs/ircan
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from circuits import load_model
from circuits.neurons import context_neurons, random_neurons_like, reweight
from tasks.context import context_accuracy, cose_kre, first_token, memotrap
from tasks.paths import shared_data

SPLITS = {
    "memotrap": (
        memotrap,
        "MemoTrap/memo-trap_classification_dev.jsonl",
        "MemoTrap/memo-trap_classification_test.jsonl",
    ),
    "cose_kre": (cose_kre, "KRE/COSE/cose_dev.json", "KRE/COSE/cose_test.json"),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", choices=sorted(SPLITS), default="memotrap")
    parser.add_argument("--data", type=Path, help="folder holding MemoTrap/ and KRE/ (default: shared data)")
    parser.add_argument("--fit", type=int, default=100, help="dev examples to attribute")
    parser.add_argument("--dev-eval", type=int, default=200, help="dev examples to choose (h, beta) on")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--h", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--beta", type=float, nargs="+", default=[2.0, 5.0, 10.0, 20.0])
    parser.add_argument("--out", type=Path, default=Path("outputs/ircan"))
    args = parser.parse_args()

    load, dev_file, test_file = SPLITS[args.dataset]
    data = args.data or shared_data("ircan", "data")
    dev, test = load(data / dev_file), load(data / test_file)
    model = load_model(args.model)
    fit = dev[: args.fit]

    start = time.perf_counter()
    found = context_neurons(
        model,
        [e.with_context for e in fit],
        [e.without_context for e in fit],
        [first_token(model, e) for e in fit],
        steps=args.steps,
    )
    fit_seconds = (time.perf_counter() - start) / len(fit)
    print(f"fit: {len(fit)} dev examples, {fit_seconds:.2f} s per example; {len(found.neurons)} neurons kept")
    error = float(found.attribution.abs_error.mean())
    print(f"completeness: mean |IG total - dP| over layers {error:.2e}")

    tuning = dev[: args.dev_eval]
    grid = {}
    for h in (h for h in args.h if h <= len(found.neurons)):
        for beta in args.beta:
            with reweight(model, found.top(h), beta):
                grid[(h, beta)] = context_accuracy(model, tuning)
            print(f"dev h={h:2d} beta={beta:5.1f}: {grid[(h, beta)]}")
    h, beta = max(grid, key=lambda key: (grid[key].accuracy, -grid[key].stubbornness))
    neurons = found.top(h)
    control = random_neurons_like(neurons, model.spec.d_mlp)

    rows = {"original": context_accuracy(model, test)}
    with reweight(model, neurons, beta):
        rows["IRCAN"] = context_accuracy(model, test)
    with reweight(model, control, beta):
        rows["random neurons"] = context_accuracy(model, test)
    print(f"\n{args.dataset} test, {len(test)} examples; chosen on dev: h={h}, beta={beta}")
    print("| model | accuracy | stubbornness |\n|---|---|---|")
    for name, scores in rows.items():
        print(f"| {name} | {scores.accuracy:.1%} | {scores.stubbornness:.1%} |")

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "dataset": args.dataset,
        "fit_examples": len(fit),
        "fit_seconds_per_example": fit_seconds,
        "h": h,
        "beta": beta,
        "neurons": neurons.tolist(),
        "dev_grid": {f"h={k[0]},beta={k[1]}": vars(v) for k, v in grid.items()},
        "test": {name: vars(scores) for name, scores in rows.items()},
    }
    (args.out / f"{args.dataset}.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / (args.dataset + '.json')}")


if __name__ == "__main__":
    main()
