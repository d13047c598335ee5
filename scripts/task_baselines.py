"""Each task's baseline on a model: clean and corrupted metric, accuracy, pairs kept of those proposed.

python scripts/task_baselines.py --model smollm2-135m --n 64      # prints a Markdown table
"""

from __future__ import annotations

import argparse

from circuits_tasks import TASKS, baseline

from circuits import load_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_model(args.model)
    print(f"{model!r}, {args.n} pairs per task, seed {args.seed}\n")
    print("| task | metric | clean | corrupted | accuracy | pairs kept / proposed |")
    print("|---|---|---|---|---|---|")
    for name, make in TASKS.items():
        data = make(model, args.n, seed=args.seed)
        result = baseline(model, data)
        metric = data.metric if isinstance(data.metric, str) else data.metric.__class__.__name__
        proposed = len(data.pairs) + data.dropped
        print(
            f"| {name} | {metric} | {result.clean_metric:.3f} | {result.corrupted_metric:.3f} | "
            f"{result.accuracy:.1%} | {len(data.pairs)} / {proposed} |"
        )


if __name__ == "__main__":
    main()
