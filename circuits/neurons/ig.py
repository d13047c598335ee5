"""Integrated gradients on MLP neurons at the last position (Knowledge Neurons, Dai et al. ACL 2022;
IRCAN, Shi et al. NeurIPS 2024).

For layer l, the layer's neuron activations at the prompt's last position are moved along
a(alpha) = a_base + alpha (a_in - a_base), everything else computed on the prompt; P(alpha) is the
probability of the target token there, and
    score_i = (a_in - a_base)_i * sum_k w_k dP/da_i(a(alpha_k)),
so that sum_i score_i ~ P(a_in) - P(a_base) (completeness, reported per layer).

Only the last position changes, and causal attention keeps every earlier position as it is, so the
`cached` implementation runs the prefix once, keeps its keys and values, and then evaluates all (layer,
step) points as one-position rows, each entering the stack at its own layer (`last_position.py`). The
`full` implementation runs the whole prompt through the whole model for every point; it is kept as the
straightforward reference (and for the speed comparison).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from circuits.distributed import gather_rows, process_chunks, shard_range
from circuits.errors import InputError
from circuits.models.hooked import HookedModel, uses_model
from circuits.models.last_position import LastPositions, Replace, run_prompts
from circuits.models.plain import down_projections, plain_model
from circuits.quadrature import Quadrature, check_steps, idgi, warn_if_incomplete
from circuits.quadrature import quadrature as quadrature_rule
from circuits.settings import with_settings

IGBaseline = Literal["zero"] | Tensor  # the path's start: zero activations, or given ones
Implementation = Literal["cached", "full"]


@dataclass(frozen=True)
class NeuronAttribution:
    """Per-example neuron scores and the completeness check, layer by layer."""

    scores: Tensor  # [n_examples, n_layers, d_mlp] (layers not attributed are zero)
    ig_total: Tensor  # [n_examples, n_layers] sum of the layer's scores
    prob_delta: Tensor  # [n_examples, n_layers] P(a_in) - P(a_base) at that layer
    layers: list[int]

    @property
    def mean(self) -> Tensor:
        """[n_layers, d_mlp] scores averaged over examples."""
        return self.scores.mean(0)

    @property
    def abs_error(self) -> Tensor:
        """Completeness error [n_layers]: mean over examples of |ig_total - prob_delta| per layer."""
        return (self.ig_total - self.prob_delta).abs().mean(0)[self.layers]

    @property
    def relative_error(self) -> Tensor:
        """[n_layers] `abs_error` / mean |prob_delta| (the names of `circuits.attribution.Completeness`)."""
        return self.abs_error / self.prob_delta.abs().mean(0)[self.layers].clamp_min(1e-12)


def _grid(steps: int, quadrature: Quadrature, compat: str | None) -> tuple[Tensor, Tensor]:
    if compat is None:
        return quadrature_rule(quadrature, steps)
    if quadrature == "idgi":
        raise InputError(
            f"compat={compat!r} reproduces a gradient weighting; IDGI has none (drop one of them)"
        )
    if compat == "ircan-code":
        # The released code differentiates through a(alpha) = alpha * a with respect to the endpoint, which
        # multiplies the gradient at alpha_k = k/m (k = 0..m-1) by alpha_k.
        alphas = torch.arange(steps, dtype=torch.float64) / steps
        return alphas, alphas / steps
    raise InputError(f"unknown compat {compat!r}; the only one is 'ircan-code'")


def _target_ids(model: HookedModel, targets: Sequence[str | int]) -> list[int]:
    ids = []
    for i, t in enumerate(targets):
        if isinstance(t, int):
            if not 0 <= t < model.d_vocab:
                raise InputError(f"target {i}: token id {t} is outside the vocabulary")
            ids.append(t)
        else:
            try:
                ids.append(model.single_token_id(t))
            except ValueError as err:
                raise InputError(f"target {i}: {err}") from None
    return ids


def _prompt_ids(model: HookedModel, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    if not prompts:
        raise InputError("no prompts given")
    if isinstance(prompts[0], str):
        ids = model.to_ids([str(p) for p in prompts])
    else:
        ids = [[int(t) for t in p] for p in prompts]
    if any(len(p) < 2 for p in ids):
        raise InputError("every prompt needs at least two tokens (a prefix and the last position)")
    return ids


@uses_model
def last_activations(model: HookedModel, prompts: Sequence[str] | Sequence[Sequence[int]]) -> Tensor:
    """[n_prompts, n_layers, d_mlp] neuron activations at each prompt's last position."""
    ids = _prompt_ids(model, prompts)
    chunks = [ids[start : start + 8] for start in range(0, len(ids), 8)]
    return torch.cat([run_prompts(model, chunk).activations.cpu() for chunk in chunks])


@dataclass(frozen=True)
class NeuronIGOptions:
    """How `neuron_ig` integrates; a wrong value raises `InputError` here.

    Attributes:
        layers: layers to attribute (default all).
        steps, quadrature: the grid: `left` (k/m, k = 0..m-1), `midpoint`, `trapezoid`, `gauss-legendre`,
            or `idgi` (each step's exact change of the probability spent over the layer's neurons by their
            share of the squared gradient: a layer's scores then sum to P(a_in) - P(a_base) exactly).
        compat: "ircan-code" reproduces the released IRCAN code's weighting (see `_grid`).
        implementation: "cached" (one-position rows over a cached prefix) or "full" (reference).
        prompts_per_pass: prompts whose rows share the passes (`cached`; `full` takes one at a time).
        max_rows: rows per pass, rounded to whole layers (the `steps` (+ 1) points of each prompt); default:
            1024 one-position rows (`cached`), one layer of one prompt, i.e. `steps` (+ 1) copies of the
            prompt, as in the released procedure (`full`).
    """

    layers: tuple[int, ...] | None = None
    steps: int = 20
    quadrature: Quadrature = "left"
    compat: str | None = None
    implementation: Implementation = "cached"
    prompts_per_pass: int = 4
    max_rows: int | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        check_steps(self.steps, "steps")
        _grid(self.steps, self.quadrature, self.compat)  # checks the rule and the compat mode
        if self.implementation not in ("cached", "full"):
            raise InputError(f"implementation must be 'cached' or 'full', got {self.implementation!r}")
        if self.prompts_per_pass < 1 or (self.max_rows is not None and self.max_rows < 1):
            raise InputError(
                f"prompts_per_pass and max_rows must be >= 1, got {self.prompts_per_pass}, {self.max_rows}"
            )


@uses_model
def neuron_ig(
    model: HookedModel,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    targets: Sequence[str | int],
    options: NeuronIGOptions | None = None,
    *,
    baseline: IGBaseline = "zero",
    quiet: bool = False,
    **settings: Any,
) -> NeuronAttribution:
    """IG scores of every MLP neuron at each prompt's last position for its target token's probability.

    Args:
        targets: one single-token string (or id) per prompt.
        options: how to integrate (`NeuronIGOptions`); any of its fields may be given as a keyword
            instead (`steps=20, implementation="full"`), taking precedence.
        baseline: "zero" (Knowledge Neurons) or [n_prompts, n_layers, d_mlp] activations (IRCAN: the
            activations without the context, from `last_activations`).
    """
    options = with_settings(options or NeuronIGOptions(), settings)
    ids = _prompt_ids(model, prompts)
    target_ids = _target_ids(model, targets)
    if len(target_ids) != len(ids):
        raise InputError(f"got {len(ids)} prompts but {len(target_ids)} targets")
    spec = model.spec
    chosen = list(range(spec.n_layers)) if options.layers is None else list(options.layers)
    if any(not 0 <= layer < spec.n_layers for layer in chosen):
        raise InputError(f"layers must lie in [0, {spec.n_layers})")
    if isinstance(baseline, Tensor) and baseline.shape != (len(ids), spec.n_layers, spec.d_mlp):
        raise InputError(
            f"baseline must have shape ({len(ids)}, {spec.n_layers}, {spec.d_mlp}), "
            f"got {tuple(baseline.shape)}"
        )
    if isinstance(baseline, str) and baseline != "zero":
        raise InputError(f"baseline must be 'zero' or a tensor of activations, got {baseline!r}")
    scores, prob_delta = _integrate(model, ids, target_ids, baseline, chosen, options, quiet)
    scores, prob_delta = gather_rows(scores, model.device), gather_rows(prob_delta, model.device)
    result = NeuronAttribution(scores, scores.sum(-1), prob_delta, chosen)
    worst = int(result.relative_error.argmax())
    report = (
        f"neuron attributions of layer {chosen[worst]}: mean |error| {float(result.abs_error[worst]):.4f} "
        "against P(a_in) - P(a_base)"
    )
    advice = f"Use more steps (now {options.steps}) or quadrature='idgi' (sums exactly)"
    warn_if_incomplete(float(result.relative_error[worst]), report, advice)
    return result


def _integrate(
    model: HookedModel,
    ids: list[list[int]],
    target_ids: list[int],
    baseline: IGBaseline,
    chosen: list[int],
    options: NeuronIGOptions,
    quiet: bool,
) -> tuple[Tensor, Tensor]:
    """This process's prompts' scores [n, L, d_mlp] and probability changes [n, L] (zero outside
    `chosen` layers)."""
    spec = model.spec
    alphas, weights = _grid(options.steps, options.quadrature, options.compat)
    if not bool((alphas == 0).any()):  # alpha = 0 gives P(a_base) for the completeness check
        alphas, weights = torch.cat([alphas, alphas.new_zeros(1)]), torch.cat([weights, weights.new_zeros(1)])
    zero = int((alphas == 0).nonzero()[0])
    alphas, weights = alphas.float(), weights.float()
    cached = options.implementation == "cached"
    prepare, per_pass = (_cached, options.prompts_per_pass) if cached else (_full, 1)
    rows = options.max_rows or (1024 if cached else len(alphas))
    mine = shard_range(len(ids), model.device, "prompts")  # all prompts, unless under torchrun
    first = mine.start
    scores = torch.zeros(len(mine), spec.n_layers, spec.d_mlp)  # rows: this process's prompts
    prob_delta = torch.zeros(len(mine), spec.n_layers)
    chunks = process_chunks(len(ids), per_pass, model.device, desc="neuron IG", unit="prompt", quiet=quiet)
    for chunk in chunks:
        batch = list(chunk)
        here = slice(batch[0] - first, batch[-1] + 1 - first)
        a_in, logits, forward = prepare(model, [ids[i] for i in batch])  # [b, L, d], [b, vocab]
        a_base = torch.zeros_like(a_in) if isinstance(baseline, str) else baseline[batch].float()
        delta = (a_in - a_base)[:, chosen]  # [b, J, d]
        values = a_base[:, chosen, None] + alphas[:, None] * delta[:, :, None]  # [b, J, K, d]
        targets_here = torch.tensor([target_ids[i] for i in batch])
        layers_per_pass = max(1, rows // (len(batch) * len(alphas)))
        grads, probs = _run_rows(forward, chosen, values, targets_here, layers_per_pass)
        p_in = logits.softmax(-1).gather(1, targets_here[:, None])  # [b, 1]
        if options.quadrature == "idgi":  # alphas are k/m ascending: add f at alpha = 1 as the last point
            path = torch.cat([probs, p_in[:, :, None].expand(-1, len(chosen), 1)], dim=2)
            scores[here, chosen] = idgi(grads, path).float()
        else:
            scores[here, chosen] = delta * (weights[:, None] * grads).sum(2)
        prob_delta[here, chosen] = p_in - probs[:, :, zero]
    return scores, prob_delta


RowForward = Callable[[list[int], Tensor], Tensor]


def _run_rows(
    forward: RowForward, layers: list[int], values: Tensor, targets: Tensor, layers_per_pass: int
) -> tuple[Tensor, Tensor]:
    """Gradients dp/da [b, J, K, d_mlp] and probabilities p [b, J, K] at the points `values` [b, J, K, d_mlp].

    `forward(layers, leaf)` returns the last position's logits [b, G, K, d_vocab] with layer `layers[g]`'s
    neurons set to leaf[:, g]; it is called `layers_per_pass` layers at a time.
    """
    grads, probs = [], []
    for start in range(0, len(layers), layers_per_pass):
        here = layers[start : start + layers_per_pass]
        leaf = values[:, start : start + len(here)].clone().requires_grad_(True)
        with torch.enable_grad():
            logits = forward(here, leaf).float()
            row_targets = targets.to(logits.device).repeat_interleave(logits.shape[1] * logits.shape[2])
            p = TargetProbability.apply(logits.flatten(0, 2), row_targets)
            (g,) = torch.autograd.grad(p.sum(), leaf)
        grads.append(g.float().cpu())
        probs.append(p.detach().float().cpu().reshape(leaf.shape[:3]))
    return torch.cat(grads, 1), torch.cat(probs, 1)


class TargetProbability(torch.autograd.Function):
    """softmax(logits)[r, targets[r]] for logits [rows, d_vocab], light on memory traffic.

    The log-normaliser is taken in row blocks (small temporaries), and the backward forms
    p_t (onehot_t - softmax) in the logits' own storage: the logits must not be used after the backward.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> Tensor:
        log_norm = torch.cat([block.logsumexp(-1) for block in logits.split(32)])
        p = (logits.gather(1, targets[:, None])[:, 0] - log_norm).exp()
        ctx.save_for_backward(logits, log_norm, p, targets)
        return p

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        logits, log_norm, p, targets = ctx.saved_tensors
        scale = grad * p
        out = logits.sub_(log_norm[:, None]).exp_().mul_(-scale[:, None])
        return out.scatter_add_(1, targets[:, None], scale[:, None]), None


def _cached(model: HookedModel, prompts: list[list[int]]) -> tuple[Tensor, Tensor, RowForward]:
    """One-position rows over the cached prefixes, each starting at its own layer."""
    last = LastPositions.of(model, prompts)
    last.check()
    forward: RowForward = lambda layers, leaf: last.run_rows(layers, leaf.to(model.device))  # noqa: E731
    return last.run.activations.cpu(), last.run.logits.cpu(), forward


def _full(model: HookedModel, prompts: list[list[int]]) -> tuple[Tensor, Tensor, RowForward]:
    """The reference: every row runs the whole prompt through the whole model (one prompt)."""
    (ids,) = prompts
    plain = plain_model(model)
    projections = down_projections(plain)
    full = torch.tensor([ids], device=model.device)

    def forward(layers: list[int], leaf: Tensor) -> Tensor:  # leaf [1, G, K, d]
        points = leaf.shape[2]
        with Replace(projections) as replace:
            for g, layer in enumerate(layers):
                index = torch.arange(g * points, (g + 1) * points, device=model.device)
                replace.patches[layer] = (index, leaf[0, g].to(model.device))
            logits = plain(full.expand(len(layers) * points, -1)).logits[:, -1]
        return logits.reshape(1, len(layers), points, -1)

    run = run_prompts(model, [ids])
    return run.activations.cpu(), run.logits.cpu(), forward
