"""IRCAN on the embedded model: fit context neurons on a dev split, choose (h, beta) on dev, report test.

Rows: the original model, IRCAN (its h most frequent context neurons scaled by beta) and two controls with
the same h and beta: random neurons with the same per-layer counts, and the h neurons whose activation rises
most from the prompt without its context to the prompt with it on the same fit examples (no gradients).
Test accuracy with a 95% bootstrap interval over examples, and the paired difference to the original model.
Data are read from the shared data folder (or --data).

    python scripts/ircan.py --dataset memotrap --fit 100 --out outputs/ircan
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from circuits_tasks.context import context_accuracy, cose_kre, first_token, memotrap
from circuits_tasks.paths import shared_data

from circuits import load_model
from circuits.evaluation.intervals import percentile_interval, resample_indices
from circuits.neurons import activation_difference_neurons, context_neurons, random_neurons_like, reweight
from circuits.quadrature import QUADRATURES

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
    parser.add_argument(
        "--quadrature",
        nargs="+",
        default=["left"],
        choices=QUADRATURES,
        help="IG rules to compare (idgi too)",
    )
    parser.add_argument("--h", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--beta", type=float, nargs="+", default=[2.0, 5.0, 10.0, 20.0])
    parser.add_argument("--out", type=Path, default=Path("outputs/ircan"))
    args = parser.parse_args()

    load, dev_file, test_file = SPLITS[args.dataset]
    data = args.data or shared_data("ircan", "data")
    dev, test = load(data / dev_file), load(data / test_file)
    model = load_model(args.model)
    fit = dev[: args.fit]

    rows = {"original": context_accuracy(model, test)}
    chosen = {}
    for rule in args.quadrature:
        start = time.perf_counter()
        found = context_neurons(
            model,
            [e.with_context for e in fit],
            [e.without_context for e in fit],
            [first_token(model, e) for e in fit],
            steps=args.steps,
            quadrature=rule,
        )
        fit_seconds = (time.perf_counter() - start) / len(fit)
        kept, error = len(found.neurons), float(found.attribution.abs_error.mean())
        print(f"{rule}: fit on {len(fit)} dev examples, {fit_seconds:.2f} s per example; {kept} neurons kept")
        print(f"{rule}: completeness, mean |IG total - dP| over layers {error:.2e}")
        grid = {}
        for h in (h for h in args.h if h <= len(found.neurons)):
            for beta in args.beta:
                with reweight(model, found.top(h), beta):
                    grid[(h, beta)] = context_accuracy(model, dev[: args.dev_eval])
                print(f"{rule} dev h={h:2d} beta={beta:5.1f}: {grid[(h, beta)]}")
        h, beta = max(grid, key=lambda key: (grid[key].accuracy, -grid[key].stubbornness))
        neurons = found.top(h)
        with reweight(model, neurons, beta):
            rows[f"IRCAN ({rule}), h = {h}, beta = {beta:g}"] = context_accuracy(model, test)
        with reweight(model, random_neurons_like(neurons, model.spec.d_mlp), beta):
            rows[f"random neurons, same layers ({rule}), beta = {beta:g}"] = context_accuracy(model, test)
        rising = activation_difference_neurons(
            model, [e.with_context for e in fit], [e.without_context for e in fit], h
        )
        with reweight(model, rising, beta):
            rows[f"{h} neurons by activation rise ({rule}), beta = {beta:g}"] = context_accuracy(model, test)
        chosen[rule] = {
            "h": h,
            "beta": beta,
            "neurons": neurons.tolist(),
            "fit_seconds_per_example": fit_seconds,
            "dev_grid": {f"h={k[0]},beta={k[1]}": v.accuracy for k, v in grid.items()},
        }
    print(f"\n{args.dataset} test, {len(test)} examples; (h, beta) chosen on dev")
    draws = resample_indices(len(test), 2000, 0)
    original = rows["original"].per_example
    assert original is not None
    intervals = {}
    print(
        "| model | accuracy [95% interval] | accuracy - original (points) | stubbornness |\n|---|---|---|---|"
    )
    for name, scores in rows.items():
        assert scores.per_example is not None
        right, gain = scores.per_example[:, 0], scores.per_example[:, 0] - original[:, 0]
        accuracy = percentile_interval(scores.accuracy, right[draws].mean(-1), 0.95)
        change = percentile_interval(float(gain.mean()), gain[draws].mean(-1), 0.95)
        intervals[name] = {"accuracy": accuracy.to_dict(), "gain": change.to_dict()}
        print(
            f"| {name} | {accuracy.estimate:.1%} [{accuracy.low:.1%}, {accuracy.high:.1%}] | "
            f"{change.estimate * 100:+.1f} [{change.low * 100:+.1f}, {change.high * 100:+.1f}] | "
            f"{scores.stubbornness:.1%} |"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "dataset": args.dataset,
        "fit_examples": len(fit),
        "steps": args.steps,
        "chosen": chosen,
        "test": {
            name: {"accuracy": scores.accuracy, "stubbornness": scores.stubbornness, "n": scores.n}
            for name, scores in rows.items()
        },
        "intervals": intervals,
    }
    (args.out / f"{args.dataset}.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / (args.dataset + '.json')}")


if __name__ == "__main__":
    main()
