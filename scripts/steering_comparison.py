"""GrAInS against plain steering at equal fluency, on TruthfulQA (one seeded fit / dev / test split).

Three directions per layer, all unit vectors applied by the same norm-preserving `steer`:
- GrAInS (`steering_vectors`: contrastive token IG at its defaults, top-k tokens ablated, PC1);
- mean difference (CAA, Rimsky et al. 2024; ActAdd, Turner et al. 2023): the mean over fit pairs of the
  residual stream after the layer at the last token of "prompt + best answer" minus that of
  "prompt + first incorrect answer";
- a random direction (seeded Gaussian), the control.
For each direction, layers x strengths (fractions of the layer's mean residual norm on the neutral text)
are swept on dev; a setting is allowed only if the perplexity of the neutral texts stays at most
`--fluency` (1.5) x the unsteered model's; the allowed setting with the best dev MC2 (then MC1) is chosen,
or none (unsteered) if no setting is allowed. MC1 / MC2 on test with 95% bootstrap intervals over
questions, and the paired difference to the unsteered model.

    python scripts/steering_comparison.py --fit 20 --dev 40 --test 200 --out outputs/steering
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from circuits_tasks.paths import shared_data
from circuits_tasks.truthfulqa import MCScores, Question, load_truthfulqa, multiple_choice, split_questions

from circuits import load_model
from circuits.evaluation.intervals import Interval, percentile_interval, resample_indices
from circuits.models.hooked import HookedModel
from circuits.steering import steer, steering_vectors

NEUTRAL = [
    "The library opens at nine in the morning and closes at six in the evening. Visitors can borrow up "
    "to five books at a time, and the reading room on the second floor is quiet and bright.",
    "To make the soup, chop two onions and a carrot, fry them gently in a little oil, then add the "
    "stock and let it simmer for twenty minutes before blending.",
    "The train to the coast leaves every hour from platform four. The journey takes about ninety "
    "minutes, and tickets are cheaper if you travel after ten o'clock.",
]


def perplexity(model: HookedModel, texts: list[str]) -> float:
    """exp of the mean next-token negative log-likelihood over all tokens of `texts`."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(model.to_ids([text]), device=model.device)
            logp = model(ids).float().log_softmax(-1)
            nll -= float(logp[0, :-1].gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def last_residuals(model: HookedModel, text: str, layers: list[int]) -> torch.Tensor:
    """[len(layers), d_model] the residual stream after each layer at the last token of `text`."""
    names = [model.resid_post_hook(layer) for layer in layers]
    with torch.no_grad(), model.capture(names) as captured:
        model(torch.tensor(model.to_ids([text]), device=model.device))
    return torch.stack([captured[name][0, -1].float() for name in names])


def mean_norm(model: HookedModel, layer: int) -> float:
    """Mean norm of the residual stream after `layer` over the tokens of the neutral texts."""
    name = model.resid_post_hook(layer)
    norms = []
    with torch.no_grad(), model.capture([name]) as captured:
        for text in NEUTRAL:
            model(torch.tensor(model.to_ids([text]), device=model.device))
            norms.append(captured[name][0].norm(dim=-1))
    return float(torch.cat(norms).mean())


def mean_difference(model: HookedModel, fit: list[Question], layers: list[int]) -> dict[int, torch.Tensor]:
    diffs = torch.stack(
        [
            last_residuals(model, f"{q.prompt} {q.best}", layers)
            - last_residuals(model, f"{q.prompt} {q.incorrect[0]}", layers)
            for q in fit
        ]
    ).mean(0)
    return {layer: diffs[j] / diffs[j].norm() for j, layer in enumerate(layers)}


def interval(values: torch.Tensor, draws: torch.Tensor) -> Interval:
    return percentile_interval(float(values.mean()), values[draws].mean(-1), 0.95)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, help="TruthfulQA.csv (default: shared data)")
    parser.add_argument("--fit", type=int, default=20)
    parser.add_argument("--dev", type=int, default=40)
    parser.add_argument("--test", type=int, default=200, help="test questions (0: all the rest)")
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 16, 22])
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.35, 0.5])
    parser.add_argument("--fluency", type=float, default=1.5, help="allowed perplexity ratio")
    parser.add_argument("--k", type=int, default=5, help="GrAInS: top tokens per sign")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("outputs/steering"))
    args = parser.parse_args()

    model = load_model(args.model)
    questions = load_truthfulqa(args.data or shared_data("truthfulqa", "TruthfulQA.csv"))
    fit, dev, test = split_questions(questions, args.fit, args.dev, args.seed)
    test = test[: args.test] if args.test else test
    layers = sorted(args.layers)
    print(f"{len(questions)} questions: fit {len(fit)}, dev {len(dev)}, test {len(test)}; layers {layers}")

    start = time.perf_counter()
    pairs = [(q.prompt, " " + q.best, " " + q.incorrect[0]) for q in fit]
    grains = steering_vectors(model, pairs, layers, k=args.k).vectors
    grains_seconds = time.perf_counter() - start
    start = time.perf_counter()
    plain = mean_difference(model, fit, layers)
    plain_seconds = time.perf_counter() - start
    gen = torch.Generator().manual_seed(args.seed)
    noise = {layer: torch.randn(model.spec.d_model, generator=gen) for layer in layers}
    directions = {
        "GrAInS": {layer: v.to(model.device) for layer, v in grains.items()},
        "mean difference (CAA / ActAdd)": {layer: v.to(model.device) for layer, v in plain.items()},
        "random direction": {layer: (v / v.norm()).to(model.device) for layer, v in noise.items()},
    }
    print(f"fit: GrAInS {grains_seconds:.0f} s, mean difference {plain_seconds:.1f} s")
    for layer in layers:
        cosine = float(directions["GrAInS"][layer] @ directions["mean difference (CAA / ActAdd)"][layer])
        print(f"layer {layer}: cosine(GrAInS, mean difference) = {cosine:+.3f}")

    base_ppl = perplexity(model, NEUTRAL)
    limit = args.fluency * base_ppl
    base_dev = multiple_choice(model, dev)
    print(f"unsteered: neutral perplexity {base_ppl:.2f} (limit {limit:.2f}); dev {base_dev}")
    norms = {layer: mean_norm(model, layer) for layer in layers}
    sweep: dict[str, list[dict[str, float]]] = {}
    chosen: dict[str, tuple[int, float] | None] = {}
    for name, table in directions.items():
        rows = []
        for layer in layers:
            for ratio in args.strengths:
                strength = ratio * norms[layer]
                with steer(model, table, strength, layers=[layer]):
                    ppl = perplexity(model, NEUTRAL)
                    scores = multiple_choice(model, dev) if ppl <= limit else None
                row = {"layer": layer, "ratio": ratio, "strength": strength, "perplexity": ppl}
                if scores is not None:
                    row.update(mc1=scores.mc1, mc2=scores.mc2)
                rows.append(row)
                shown = f"dev {scores}" if scores else "over the fluency limit"
                print(f"{name}, layer {layer}, {ratio:.2f} x norm: perplexity {ppl:.2f}, {shown}", flush=True)
        sweep[name] = rows
        allowed = [r for r in rows if "mc2" in r]
        best = max(allowed, key=lambda r: (r["mc2"], r["mc1"]), default=None)
        chosen[name] = None if best is None else (int(best["layer"]), best["strength"])

    draws = resample_indices(len(test), args.resamples, args.seed)
    base_test = multiple_choice(model, test)
    assert base_test.per_question is not None
    results: dict[str, dict[str, object]] = {}

    def report(name: str, scores: MCScores, ppl: float, setting: str) -> None:
        assert scores.per_question is not None and base_test.per_question is not None
        gain = scores.per_question - base_test.per_question
        results[name] = {
            "setting": setting,
            "mc1": interval(scores.per_question[:, 0], draws).to_dict(),
            "mc2": interval(scores.per_question[:, 1], draws).to_dict(),
            "mc2_gain": interval(gain[:, 1], draws).to_dict(),
            "mc1_gain": interval(gain[:, 0], draws).to_dict(),
            "perplexity": ppl,
        }

    report("unsteered", base_test, base_ppl, "-")
    for name, table in directions.items():
        picked = chosen[name]
        if picked is None:
            report(name, base_test, base_ppl, "no setting within the fluency limit: unsteered")
            continue
        layer, strength = picked
        with steer(model, table, strength, layers=[layer]):
            scores, ppl = multiple_choice(model, test), perplexity(model, NEUTRAL)
        report(name, scores, ppl, f"layer {layer}, {strength / norms[layer]:.2f} x norm")

    def pct(d: object) -> str:
        assert isinstance(d, dict)
        return f"{d['estimate']:.1%} [{d['low']:.1%}, {d['high']:.1%}]"

    def signed(d: object) -> str:
        assert isinstance(d, dict)
        return f"{d['estimate'] * 100:+.1f} [{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}]"

    print(f"\ntest ({len(test)} questions), settings chosen on dev under perplexity <= {limit:.2f}")
    print("| steering | setting (dev) | MC1 | MC2 | MC2 - unsteered (points) | perplexity, neutral |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        print(
            f"| {name} | {row['setting']} | {pct(row['mc1'])} | {pct(row['mc2'])} | "
            f"{signed(row['mc2_gain'])} | {row['perplexity']:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    report_file = args.out / "steering_comparison.json"
    report_file.write_text(
        json.dumps(
            {
                "model": args.model,
                "split": {"fit": len(fit), "dev": len(dev), "test": len(test), "seed": args.seed},
                "layers": layers,
                "fluency_limit": limit,
                "unsteered_perplexity": base_ppl,
                "fit_seconds": {"GrAInS": grains_seconds, "mean difference": plain_seconds},
                "dev_sweep": sweep,
                "test": results,
            },
            indent=2,
        )
    )
    print(f"wrote {report_file}")


if __name__ == "__main__":
    main()
