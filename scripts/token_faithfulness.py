"""Faithfulness tests of token attributions on the embedded model, on IOI and TruthfulQA prompts.

f is a contrast: log p(answer) - log p(distractor) after an IOI prompt (the logit difference), and
log p(best answer) - log p(first incorrect answer) after a TruthfulQA prompt. For each method and prompt:
its completeness error where it has one, deletion / insertion AUC, comprehensiveness, sufficiency
(`circuits.steering.faithfulness`: tokens removed by the pad token, the first position never), Spearman
rank agreement with occlusion (leave one token out) and with the default IG, and the seconds it took.
Intervals: 95% bootstrap over prompts.

    python scripts/token_faithfulness.py --ioi 8 --truthfulqa 8 --out outputs/token_faithfulness
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from circuits_tasks import ioi_pairs
from circuits_tasks.paths import shared_data
from circuits_tasks.truthfulqa import load_truthfulqa, split_questions

from circuits import load_model
from circuits.models.hooked import HookedModel
from circuits.steering import TokenAttribution, contrastive_token_ig, gradient_x_input
from circuits.steering.faithfulness import rank_agreement, summarize, token_faithfulness

DEFAULT = "IG, adaptive (default: pad baseline, first token kept, 64 steps)"
OCCLUSION = "occlusion (leave one token out)"
IG_METHODS: dict[str, dict[str, Any]] = {
    DEFAULT: {},
    "IG, Gauss-Legendre, 64 steps": {"quadrature": "gauss-legendre"},
    "IG, zero baseline, first token moves (GL 64; the old default)": {
        "quadrature": "gauss-legendre",
        "baseline": "zero",
        "keep_first": False,
    },
    "IDGI, 64 steps": {"quadrature": "idgi"},
    "sequential IG (adaptive, 24 steps per token)": {"path": "sequential", "steps": 24},
    "layer IG (output of layer 10, adaptive)": {"layer": 10},
}


def prompts(model: HookedModel, n_ioi: int, n_truthfulqa: int, data: Path | None) -> dict[str, list]:
    pairs = ioi_pairs(model, n_ioi, seed=0).pairs
    ioi = []
    for i in range(len(pairs)):
        prompt = model.tokenizer.decode(pairs.clean[i, : pairs.lengths[i]].tolist())
        answer, distractor = (model.tokenizer.decode([int(t[i])]) for t in (pairs.answer, pairs.distractor))
        ioi.append((prompt, answer, distractor))
    questions = load_truthfulqa(data or shared_data("truthfulqa", "TruthfulQA.csv"))
    _, _, test = split_questions(questions, 20, 40, seed=0)  # the steering script's test questions
    truthful = [(q.prompt, " " + q.best, " " + q.incorrect[0]) for q in test[:n_truthfulqa]]
    return {"IOI": ioi, "TruthfulQA": truthful}


def attributions(model: HookedModel, prompt: str, preferred: str, dispreferred: str, seed: int) -> dict:
    """{method: (scores [P], relative completeness error or None, seconds)}."""
    found: dict[str, tuple[torch.Tensor, float | None, float]] = {}

    def timed(name: str, run: Callable[[], TokenAttribution], complete: bool = True) -> TokenAttribution:
        start = time.perf_counter()
        result = run()
        found[name] = (
            result.scores,
            result.relative_error if complete else None,
            time.perf_counter() - start,
        )
        return result

    for name, options in IG_METHODS.items():

        def run(o: dict[str, Any] = options) -> TokenAttribution:
            return contrastive_token_ig(model, prompt, preferred, dispreferred, warn=False, **o)

        result = timed(name, run)
        if result.token_deltas is not None:
            found[OCCLUSION] = (result.token_deltas, None, found[name][2])
    timed(
        "gradient x (input - baseline)",
        lambda: gradient_x_input(model, prompt, preferred, dispreferred=dispreferred),
        complete=False,
    )
    n = len(found[DEFAULT][0])
    random = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    found["random scores (control)"] = (random, None, 0.0)
    return found


def table(model: HookedModel, rows: list, seed: int) -> tuple[list[str], dict]:
    per_method: dict[str, dict[str, list]] = {}
    for i, (prompt, preferred, dispreferred) in enumerate(rows):
        found = attributions(model, prompt, preferred, dispreferred, seed + i)
        for name, (scores, error, seconds) in found.items():
            entry = per_method.setdefault(
                name, {"tests": [], "errors": [], "seconds": [], "occ": [], "ig": []}
            )
            entry["tests"].append(
                token_faithfulness(model, prompt, scores, preferred, dispreferred=dispreferred)
            )
            entry["errors"].append(error)
            entry["seconds"].append(seconds)
            entry["occ"].append(rank_agreement(scores, found[OCCLUSION][0]))
            entry["ig"].append(rank_agreement(scores, found[DEFAULT][0]))
        print(f"  prompt {i + 1}/{len(rows)} done", flush=True)
    lines = [
        "| method | completeness error, mean (max) | deletion AUC (lower better) | insertion AUC (higher "
        "better) | comprehensiveness | sufficiency | Spearman with occlusion | Spearman with default IG "
        "| s per prompt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    out = {}
    for name, entry in per_method.items():
        summary = summarize(entry["tests"], seed=seed)
        errors = [e for e in entry["errors"] if e is not None]
        completeness = (
            f"{sum(errors) / len(errors):.1%} ({max(errors):.1%})" if errors else "not complete by design"
        )
        occ, ig = (sum(entry[k]) / len(entry[k]) for k in ("occ", "ig"))
        seconds = sum(entry["seconds"]) / len(entry["seconds"])
        lines.append(
            f"| {name} | {completeness} | {summary.deletion_auc} | {summary.insertion_auc} | "
            f"{summary.comprehensiveness} | {summary.sufficiency} | {occ:.2f} | {ig:.2f} | {seconds:.1f} |"
        )
        out[name] = {
            "completeness_errors": entry["errors"],
            "deletion_auc": summary.deletion_auc.to_dict(),
            "insertion_auc": summary.insertion_auc.to_dict(),
            "comprehensiveness": summary.comprehensiveness.to_dict(),
            "sufficiency": summary.sufficiency.to_dict(),
            "spearman_occlusion": occ,
            "spearman_default_ig": ig,
            "seconds": seconds,
        }
    return lines, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ioi", type=int, default=8, help="IOI prompts")
    parser.add_argument("--truthfulqa", type=int, default=8, help="TruthfulQA prompts")
    parser.add_argument("--data", type=Path, help="TruthfulQA.csv (default: shared data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/token_faithfulness"))
    args = parser.parse_args()

    model = load_model(args.model)
    report = {}
    for dataset, rows in prompts(model, args.ioi, args.truthfulqa, args.data).items():
        print(f"{dataset}: {len(rows)} prompts", flush=True)
        lines, report[dataset] = table(model, rows, args.seed)
        print(f"\n{dataset} ({len(rows)} prompts)\n" + "\n".join(lines) + "\n", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "token_faithfulness.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'token_faithfulness.json'}")


if __name__ == "__main__":
    main()
