"""RelP against EAP and EAP-IG-inputs as estimates of activation patching, split as in the RelP paper.

For every layer l and real position p of every example, the component's exact effect is
M(clean with that one activation set to its corrupted value) - M(clean) (activation patching), and each
method's estimate is (corrupted - clean activation) . gradient there:
- residual stream: the input of block l (`hook_resid_pre`); attention outputs: `hook_attn_out`;
  MLP outputs: `hook_mlp_out`;
- eap: the gradient at the clean input; relp: the same with RelP's backward rules (Jafari et al. 2025,
  arXiv 2508.21258: LN, identity, half; CP off); eap-ig-inputs: averaged over m inputs on the path from the
  corrupted to the clean embeddings (EAP-IG's left rule).
Pearson correlations are taken over all (example, layer, position) entries of a kind. The estimates are
checked against `attribute`'s node scores (they sum to them over positions and heads).

    python scripts/relp_comparison.py --model smollm2 --n 16
    python scripts/relp_comparison.py --model gpt2-small-random --n 8
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from circuits_tasks import ioi_pairs
from torch import Tensor

from circuits import Graph, attribute, load_model
from circuits.attribution.methods import MethodName
from circuits.data import PromptPairs
from circuits.metrics import logit_diff
from circuits.models import HookedModel
from circuits.models.relp import RelPBackward, RelPRules
from circuits.quadrature import quadrature

sys.path.insert(0, str(Path(__file__).parent))
from benchmark import random_model, random_pairs

PAPER = {  # RelP paper, GPT-2 small IOI, Pearson with activation patching: (AtP, RelP)
    "residual stream": (0.753, 0.968),
    "attention outputs": (0.979, 0.962),
    "MLP outputs": (0.195, 0.992),
}


def points(model: HookedModel) -> dict[str, list[str]]:
    layers = range(model.spec.n_layers)
    return {
        "residual stream": [model.resid_pre_hook(layer) for layer in layers],
        "attention outputs": [model.attn_out_hook(layer) for layer in layers],
        "MLP outputs": [model.mlp_out_hook(layer) for layer in layers],
    }


def activations(model: HookedModel, ids: Tensor, mask: Tensor, names: list[str]) -> dict[str, Tensor]:
    seen: dict[str, Tensor] = {}
    hooks = [(n, lambda x, n=n: seen.__setitem__(n, x.detach().clone())) for n in names]
    with torch.no_grad(), model.hooks(hooks):
        model(ids, mask)
    return seen


def gradients(
    model: HookedModel, pairs: PromptPairs, names: list[str], rules: RelPRules | None, steps: int
) -> dict[str, Tensor]:
    """dM/d(activation) [b, P, d] at `names`, at the clean input (steps = 0) or averaged over EAP-IG's
    input path (steps = m)."""
    ids, mask = pairs.clean, pairs.attention_mask
    ends: dict[str, Tensor] = {}
    if steps:
        for key, source in (("clean", pairs.clean), ("corrupted", pairs.corrupted)):
            ends[key] = activations(model, source, mask, [model.input_hook])[model.input_hook]
    alphas, weights = quadrature("left", steps) if steps else (torch.ones(1), torch.ones(1))
    total = {n: torch.zeros(0) for n in names}
    backward = RelPBackward(model, rules) if rules is not None else None
    for alpha, weight in zip(alphas.tolist(), weights.tolist()):
        grads: dict[str, Tensor] = {}

        def keep(x: Tensor, n: str, grads: dict[str, Tensor] = grads) -> Tensor:
            y = x.view_as(x)
            y.register_hook(lambda g: grads.__setitem__(n, g.detach().float()))
            return y

        def start(x: Tensor, alpha: float = alpha) -> Tensor:
            if not ends:
                return x.detach().requires_grad_(True)
            return (ends["corrupted"] + alpha * (ends["clean"] - ends["corrupted"])).requires_grad_(True)

        hooks: list[tuple[str, Callable]] = [(model.input_hook, start)]
        hooks += [(n, lambda x, n=n: keep(x, n)) for n in names]
        hooks = hooks if backward is None else backward.around(hooks)
        with torch.enable_grad(), model.hooks(hooks):
            logit_diff(model(ids, mask), pairs).sum().backward()
        for n in names:
            total[n] = grads[n] * weight if total[n].numel() == 0 else total[n] + grads[n] * weight
    return total


def exact_effects(model: HookedModel, pairs: PromptPairs, name: str, corrupted: Tensor, rows: int) -> Tensor:
    """[b, P]: M(clean, activation `name` at one position set to corrupted) - M(clean); 0 at padding."""
    b, n_pos = pairs.clean.shape
    with torch.no_grad():
        base = logit_diff(model(pairs.clean, pairs.attention_mask), pairs)
    effects = torch.zeros(b, n_pos)
    per = max(1, rows // b)
    for first in range(0, n_pos, per):
        positions = list(range(first, min(first + per, n_pos)))
        k = len(positions)

        def patch(x: Tensor, positions: list[int] = positions) -> Tensor:
            out = x.clone()
            for i, p in enumerate(positions):
                out[i * b : (i + 1) * b, p] = corrupted[:, p]
            return out

        with torch.no_grad(), model.hooks([(name, patch), last_position(model, pairs.lengths.repeat(k))]):
            logits = model(pairs.clean.repeat(k, 1), pairs.attention_mask.repeat(k, 1))[:, 0]
        answer, distractor = pairs.answer.repeat(k), pairs.distractor.repeat(k)
        every = torch.arange(k * b)
        values = (logits[every, answer] - logits[every, distractor]).float().reshape(k, b)
        effects[:, first : first + k] = (values - base).T.cpu()
    real = torch.arange(n_pos)[None] < pairs.lengths[:, None]
    return effects * real


def last_position(model: HookedModel, lengths: Tensor) -> tuple[str, Callable]:
    """A hook unembedding only each row's last real position (the metric reads nothing else)."""

    def keep(x: Tensor) -> Tensor:
        return x[torch.arange(x.shape[0]), lengths.to(x.device) - 1][:, None]

    return (model.unembed_in_hook, keep)


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "gpt2-small-random"])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG-inputs steps (default 5)")
    parser.add_argument("--rows", type=int, default=64, help="rows per patching forward pass")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "smollm2":
        model = load_model("smollm2-135m")
        pairs = ioi_pairs(model, args.n, seed=0).pairs
    else:
        model = random_model("gpt2-small-random")
        pairs = random_pairs(model, args.n, 16)
    kinds = points(model)
    names = [n for group in kinds.values() for n in group]
    clean = activations(model, pairs.clean, pairs.attention_mask, names)
    corrupted = activations(model, pairs.corrupted, pairs.attention_mask, names)
    real = (torch.arange(pairs.clean.shape[1])[None] < pairs.lengths[:, None]).flatten()

    start = time.perf_counter()
    exact = {n: exact_effects(model, pairs, n, corrupted[n], args.rows) for n in names}
    print(f"activation patching: {len(names)} activations x positions in {time.perf_counter() - start:.0f} s")
    estimates = {}
    runs: list[tuple[MethodName, RelPRules | None, int]] = [
        ("eap", None, 0),
        ("eap-ig-inputs", None, args.steps),
        ("relp", RelPRules(), 0),
    ]
    for method, rules, steps in runs:
        grads = gradients(model, pairs, names, rules, steps)
        estimates[method] = {n: ((corrupted[n] - clean[n]) * grads[n]).sum(-1).cpu() for n in names}
        check = attribute(
            model,
            Graph.from_model(model),
            pairs,
            method=method,
            ig_steps=args.steps,
            level="node",
            quiet=True,
        )
        assert check.node_scores is not None
        last_mlp = model.mlp_out_hook(model.spec.n_layers - 1)
        ours = float(estimates[method][last_mlp].sum(1).mean())
        theirs = float(check.node_scores[-1])
        assert abs(ours - theirs) <= 1e-3 * max(abs(theirs), 1e-6), f"{method}: {ours} vs attribute {theirs}"

    print(f"\n{args.model}, {args.n} pairs; Pearson with activation patching over (example, layer, position)")
    header = f"| component | eap | eap-ig-inputs (m = {args.steps}) | relp | paper GPT-2 small: AtP / RelP |"
    print(header + "\n|---|---|---|---|---|")
    for kind, group in kinds.items():
        truth = torch.stack([exact[n].flatten()[real] for n in group]).flatten()
        row = [
            pearson(torch.stack([estimates[m][n].flatten()[real] for n in group]).flatten(), truth)
            for m in ("eap", "eap-ig-inputs", "relp")
        ]
        atp, relp = PAPER[kind]
        print(f"| {kind} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | {atp:.3f} / {relp:.3f} |")


if __name__ == "__main__":
    main()
