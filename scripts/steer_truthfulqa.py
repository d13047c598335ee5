"""GrAInS on TruthfulQA: fit steering vectors on a fit split, choose layer and strength on dev, report test.

Reports MC1 / MC2 unsteered and steered, perplexity on a neutral text with and without steering (fluency),
the fit time, and a few greedy generations with and without steering.

    python scripts/steer_truthfulqa.py --fit 50 --dev 60 --out outputs/steering
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from circuits_tasks.paths import shared_data
from circuits_tasks.truthfulqa import load_truthfulqa, multiple_choice, split_questions

from circuits import load_model
from circuits.models.hooked import HookedModel
from circuits.steering import generate, steer, steering_vectors

NEUTRAL = (
    "The library opens at nine in the morning and closes at six in the evening. Visitors can borrow up to "
    "five books at a time, and the reading room on the second floor is quiet and bright."
)


def perplexity(model: HookedModel, text: str) -> float:
    ids = torch.tensor(model.to_ids([text]), device=model.device)
    with torch.no_grad():
        logp = model(ids).float().log_softmax(-1)
    nll = -logp[0, :-1].gather(1, ids[0, 1:, None]).mean()
    return math.exp(float(nll))


def residual_norm(model: HookedModel, text: str, layer: int) -> float:
    """Mean norm of the residual stream after `layer` over the tokens of `text`."""
    captured: dict[str, torch.Tensor] = {}
    ids = torch.tensor(model.to_ids([text]), device=model.device)
    with (
        torch.no_grad(),
        model.hooks([(model.resid_post_hook(layer), lambda x: captured.setdefault("h", x))]),
    ):
        model(ids)
    return float(captured["h"][0].norm(dim=-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, help="TruthfulQA.csv (default: shared data)")
    parser.add_argument("--fit", type=int, default=50)
    parser.add_argument("--dev", type=int, default=60)
    parser.add_argument("--test", type=int, default=0, help="test questions to score (0: all the rest)")
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 14, 20, 26])
    parser.add_argument(
        "--strengths",
        type=float,
        nargs="+",
        default=[0.1, 0.25, 0.5, 1.0],
        help="strengths as fractions of the layer's mean residual norm (the vectors have unit length)",
    )
    parser.add_argument("--k", type=int, default=5, help="top tokens per sign")
    parser.add_argument("--steps", type=int, default=20, help="IG steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/steering"))
    args = parser.parse_args()

    model = load_model(args.model)
    fit, dev, test = split_questions(
        load_truthfulqa(args.data or shared_data("truthfulqa", "TruthfulQA.csv")),
        args.fit,
        args.dev,
        args.seed,
    )
    test = test[: args.test] if args.test else test
    pairs = [(q.prompt, " " + q.best, " " + q.incorrect[0]) for q in fit]
    start = time.perf_counter()
    vectors = steering_vectors(model, pairs, args.layers, k=args.k, steps=args.steps)
    fit_seconds = time.perf_counter() - start
    print(f"fit: {len(pairs)} pairs in {fit_seconds:.0f} s ({fit_seconds / len(pairs):.2f} s per pair)")
    print("example top tokens (positive / negative):", vectors.top_tokens[0])

    unsteered_dev = multiple_choice(model, dev)
    print(f"dev unsteered: {unsteered_dev}")
    grid = {}
    for layer in args.layers:
        scale = residual_norm(model, NEUTRAL, layer)
        for strength in (ratio * scale for ratio in args.strengths):
            with steer(model, vectors, strength, layers=[layer]):
                grid[(layer, strength)] = multiple_choice(model, dev)
            result = grid[(layer, strength)]
            print(f"dev layer {layer:2d} strength {strength:6.1f} ({strength / scale:.2f} x norm): {result}")
    layer, strength = max(grid, key=lambda key: (grid[key].mc2, grid[key].mc1))

    plain = multiple_choice(model, test)
    with steer(model, vectors, strength, layers=[layer]):
        steered = multiple_choice(model, test)
        steered_ppl = perplexity(model, NEUTRAL)
    plain_ppl = perplexity(model, NEUTRAL)
    print(f"\ntest ({len(test)} questions), layer {layer}, strength {strength} chosen on dev")
    print("| model | MC1 | MC2 | perplexity (neutral text) |\n|---|---|---|---|")
    print(f"| unsteered | {plain.mc1:.1%} | {plain.mc2:.1%} | {plain_ppl:.2f} |")
    print(f"| steered | {steered.mc1:.1%} | {steered.mc2:.1%} | {steered_ppl:.2f} |")

    generations = []
    for q in test[:3]:
        before = generate(model, q.prompt, 25)
        with steer(model, vectors, strength, layers=[layer]):
            after = generate(model, q.prompt, 25)
        generations.append({"question": q.question, "unsteered": before, "steered": after})
        print(f"\nQ: {q.question}\n  unsteered: {before!r}\n  steered:   {after!r}")

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "fit_pairs": len(pairs),
        "fit_seconds": fit_seconds,
        "layer": layer,
        "strength": strength,
        "dev_unsteered": vars(unsteered_dev),
        "dev_grid": {f"layer={k[0]},strength={k[1]}": vars(v) for k, v in grid.items()},
        "test": {"unsteered": vars(plain), "steered": vars(steered)},
        "perplexity": {"unsteered": plain_ppl, "steered": steered_ppl},
        "generations": generations,
    }
    (args.out / "truthfulqa.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'truthfulqa.json'}")


if __name__ == "__main__":
    main()
