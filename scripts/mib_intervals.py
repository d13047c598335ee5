"""CPR and CMD with 95% bootstrap intervals on held-out IOI pairs, for EAP, EAP-IG-inputs and RelP, under
each selection strategy (`--strategies`: top_n, filled, ratio:R; circuits.selection.strategies;
refined:R, top-n refined for R rounds on the scoring pairs, circuits.evaluation.refinement), with a score
ensemble of the methods (`--ensemble`) and bootstrap sign-consistency filtering (`--sign-consistency R`).

Scores on the first `--n` generated IOI pairs, circuits at the MIB budgets (MIB's protocol, docs/mib.md),
evaluated on the next `--n` (disjoint draws of the generator); intervals from `--resamples` bootstrap
draws over the evaluation pairs (circuits.evaluation.intervals).

    python scripts/mib_intervals.py --n 64          # SmolLM2-135M-Instruct
    python scripts/mib_intervals.py --n 64 --methods eap-ig-inputs --sign-consistency 10
    python scripts/mib_intervals.py --n 64 --strategies top_n filled ratio:0.5 ratio:0.8 --ensemble
    python scripts/mib_intervals.py --n 64 --methods eap-ig-inputs --strategies top_n refined:2
"""

from __future__ import annotations

import argparse
import time

from circuits_tasks import ioi_pairs

from circuits import Graph, attribute, load_model
from circuits.attribution import ScoringOptions
from circuits.attribution.methods import MethodName
from circuits.evaluation.curves import PROTOCOLS, mib_scores
from circuits.evaluation.intervals import bootstrap_scores, sign_consistent
from circuits.evaluation.refinement import refined_selection
from circuits.selection.strategies import Selection, Selector, ensemble_scores, ratio_selection


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["eap", "eap-ig-inputs", "relp"])
    parser.add_argument(
        "--sign-consistency",
        type=int,
        default=0,
        metavar="R",
        help="also each method's scores filtered by bootstrap sign consistency over R resamples",
    )
    parser.add_argument("--agreement", type=float, default=0.9)
    parser.add_argument("--strategies", nargs="+", default=["top_n"], help="top_n, filled, ratio:R, ...")
    parser.add_argument("--ensemble", action="store_true", help="also the mean ensemble of the methods")
    parser.add_argument("--protocol", default="mib", choices=PROTOCOLS)
    args = parser.parse_args()
    model = load_model(args.model)
    task = ioi_pairs(model, 2 * args.n)
    if len(task.pairs) < 2 * args.n:
        raise SystemExit(f"only {len(task.pairs)} IOI pairs could be made")
    scoring, held_out = task.pairs[: args.n], task.pairs[args.n : 2 * args.n]

    def strategy(name: str) -> Selection | Selector:
        if name.startswith("ratio:"):
            return ratio_selection(float(name.split(":")[1]))
        if name.startswith("refined:"):  # refined on the scoring pairs, never on the held-out ones
            rounds = int(name.split(":")[1])
            return refined_selection(model, scoring, task.metric, rounds=rounds, batch_size=args.batch_size)
        return name  # type: ignore[return-value]

    strategies = [(name, strategy(name)) for name in args.strategies]
    print(
        f"{args.model}: {args.n} pairs to score, {args.n} held-out pairs to evaluate, {args.resamples} draws"
    )
    print(
        "\n| method | selection | CPR (95% interval) | CMD (95% interval) | seconds |\n|---|---|---|---|---|"
    )
    scored_graphs = []
    for method in args.methods:
        start = time.perf_counter()
        graph = Graph.from_model(model)
        name: MethodName = method  # type: ignore[assignment]
        attribute(
            model,
            graph,
            scoring,
            task.metric,
            name,
            ig_steps=args.steps,
            batch_size=args.batch_size,
            quiet=True,
        )
        scored_graphs.append(graph)
        rows = [(method, graph)]
        if args.sign_consistency:
            options = ScoringOptions(name, ig_steps=args.steps, batch_size=args.batch_size)
            resampled = bootstrap_scores(
                model, scoring, task.metric, options, resamples=args.sign_consistency
            )
            label = (
                f"{method}, sign-consistent ({args.sign_consistency} resamples, agreement {args.agreement})"
            )
            rows.append((label, sign_consistent(graph, resampled, args.agreement)))
        if args.ensemble and method == args.methods[-1]:
            rows.append((f"mean ensemble of {', '.join(args.methods)}", ensemble_scores(scored_graphs)))
        for label, scored in rows:
            for strategy, selection in strategies:
                scores = mib_scores(
                    model,
                    scored,
                    held_out,
                    task.metric,
                    selection=selection,
                    protocol=args.protocol,
                    batch_size=args.batch_size,
                    resamples=args.resamples,
                    quiet=True,
                )
                seconds = time.perf_counter() - start
                cpr, cmd = scores.cpr_interval, scores.cmd_interval
                print(f"| {label} | {strategy} | {cpr} | {cmd} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
