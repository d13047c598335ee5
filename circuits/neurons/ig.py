"""Integrated gradients on MLP neurons at the last position (Knowledge Neurons; IRCAN), DESIGN.md section 5.

For layer l, the layer's neuron activations at the prompt's last position are moved along
a(alpha) = a_base + alpha (a_in - a_base), everything else computed on the prompt; P(alpha) is the
probability of the target token there, and
    score_i = (a_in - a_base)_i * sum_k w_k dP/da_i(a(alpha_k)),
so that sum_i score_i ~ P(a_in) - P(a_base) (completeness, reported per layer).

Only the last position changes, and causal attention keeps every earlier position as it is, so the
`cached` implementation runs the prefix once, keeps its keys and values, and then evaluates all (layer,
step) points as one-position rows of one batch. The `full` implementation runs the whole prompt for every
point; it is kept as the straightforward reference (and for the speed comparison).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm
from transformers import DynamicCache

from circuits.models.hooked import HookedModel
from circuits.models.plain import down_projections, plain_model
from circuits.quadrature import quadrature as quadrature_rule

Baseline = Literal["zero"] | Tensor
Implementation = Literal["cached", "full"]


@dataclass
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
    def completeness_error(self) -> Tensor:
        """[n_layers] mean over examples of |ig_total - prob_delta| for the attributed layers."""
        return (self.ig_total - self.prob_delta).abs().mean(0)[self.layers]


def _grid(steps: int, quadrature: str, compat: str | None) -> tuple[Tensor, Tensor]:
    if compat is None:
        return quadrature_rule(quadrature, steps)
    if compat == "ircan-code":
        # The released code differentiates through a(alpha) = alpha * a with respect to the endpoint, which
        # multiplies the gradient at alpha_k = k/m (k = 0..m-1) by alpha_k.
        alphas = torch.arange(steps, dtype=torch.float64) / steps
        return alphas, alphas / steps
    raise ValueError(f"unknown compat {compat!r}; the only one is 'ircan-code'")


def _target_ids(model: HookedModel, targets: Sequence[str | int]) -> list[int]:
    ids = []
    for i, t in enumerate(targets):
        if isinstance(t, int):
            if not 0 <= t < model.d_vocab:
                raise ValueError(f"target {i}: token id {t} is outside the vocabulary")
            ids.append(t)
        else:
            try:
                ids.append(model.single_token_id(t))
            except ValueError as err:
                raise ValueError(f"target {i}: {err}") from None
    return ids


def _prompt_ids(model: HookedModel, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    if not prompts:
        raise ValueError("no prompts given")
    if isinstance(prompts[0], str):
        ids = model.to_ids([str(p) for p in prompts])
    else:
        ids = [[int(t) for t in p] for p in prompts]
    if any(len(p) < 2 for p in ids):
        raise ValueError("every prompt needs at least two tokens (a prefix and the last position)")
    return ids


class _Replace:
    """Pre-hooks on the down projections: rows [start, stop) of layer l get `values` at the last position."""

    def __init__(self, projections: list[nn.Module]) -> None:
        self.projections = projections
        self.patches: dict[int, tuple[int, int, Tensor]] = {}
        self.recorded: dict[int, Tensor] = {}

    def hook(self, layer: int):
        def pre(_module: nn.Module, args: tuple) -> tuple | None:
            (x,) = args
            self.recorded[layer] = x[:, -1].detach()
            if layer not in self.patches:
                return None
            start, stop, values = self.patches[layer]
            last = torch.cat([x[:start, -1], values.to(x.dtype), x[stop:, -1]])
            return (torch.cat([x[:, :-1], last[:, None]], dim=1),)

        return pre

    def __enter__(self) -> _Replace:
        self.handles = [p.register_forward_pre_hook(self.hook(i)) for i, p in enumerate(self.projections)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def last_activations(model: HookedModel, prompts: Sequence[str] | Sequence[Sequence[int]]) -> Tensor:
    """[n_prompts, n_layers, d_mlp] neuron activations at each prompt's last position."""
    plain = plain_model(model)
    out = []
    with _Replace(down_projections(plain)) as replace, torch.no_grad():
        for ids in _prompt_ids(model, prompts):
            plain(torch.tensor([ids], device=model.device))
            out.append(torch.stack([replace.recorded[layer][0] for layer in range(model.spec.n_layers)]))
    return torch.stack(out).float()


def neuron_ig(
    model: HookedModel,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    targets: Sequence[str | int],
    *,
    baseline: Baseline = "zero",
    layers: Sequence[int] | None = None,
    steps: int = 20,
    quadrature: str = "left",
    compat: str | None = None,
    implementation: Implementation = "cached",
    max_rows: int = 256,
    quiet: bool = False,
) -> NeuronAttribution:
    """IG scores of every MLP neuron at each prompt's last position for its target token's probability.

    Args:
        targets: one single-token string (or id) per prompt.
        baseline: "zero" (Knowledge Neurons) or [n_prompts, n_layers, d_mlp] activations (IRCAN: the
            activations without the context, from `last_activations`).
        layers: layers to attribute (default all).
        quadrature: `left` (k/m, k = 0..m-1), `midpoint`, `trapezoid`, `gauss-legendre`.
        compat: "ircan-code" reproduces the released IRCAN code's weighting (see `_grid`).
        implementation: "cached" (one-position rows over a cached prefix) or "full" (reference).
        max_rows: rows per batched pass.
    """
    ids = _prompt_ids(model, prompts)
    target_ids = _target_ids(model, targets)
    if len(target_ids) != len(ids):
        raise ValueError(f"got {len(ids)} prompts but {len(target_ids)} targets")
    spec = model.spec
    chosen = list(range(spec.n_layers)) if layers is None else sorted(set(layers))
    if any(not 0 <= layer < spec.n_layers for layer in chosen):
        raise ValueError(f"layers must lie in [0, {spec.n_layers})")
    if isinstance(baseline, Tensor) and baseline.shape != (len(ids), spec.n_layers, spec.d_mlp):
        raise ValueError(
            f"baseline must have shape ({len(ids)}, {spec.n_layers}, {spec.d_mlp}), "
            f"got {tuple(baseline.shape)}"
        )
    if isinstance(baseline, str) and baseline != "zero":
        raise ValueError(f"baseline must be 'zero' or a tensor of activations, got {baseline!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    alphas, weights = _grid(steps, quadrature, compat)
    # two extra points per layer with weight 0, for the completeness check: alpha = 0 and alpha = 1
    alphas = torch.cat([alphas, torch.tensor([0.0, 1.0], dtype=alphas.dtype)]).float()
    weights = torch.cat([weights, torch.zeros(2, dtype=weights.dtype)]).float()
    run = _cached_rows if implementation == "cached" else _full_rows
    used = weights != 0
    if implementation not in ("cached", "full"):
        raise ValueError(f"implementation must be 'cached' or 'full', got {implementation!r}")

    n = len(ids)
    scores = torch.zeros(n, spec.n_layers, spec.d_mlp)
    ig_total = torch.zeros(n, spec.n_layers)
    prob_delta = torch.zeros(n, spec.n_layers)
    for i in tqdm(range(n), desc="neuron IG", unit="prompt", disable=quiet):
        a_in = last_activations(model, [ids[i]])[0]  # [L, d_mlp]
        a_base = torch.zeros_like(a_in) if isinstance(baseline, str) else baseline[i].float()
        grads, probs = run(model, ids[i], target_ids[i], chosen, a_base, a_in, alphas, max_rows)
        for j, layer in enumerate(chosen):
            delta = a_in[layer] - a_base[layer]
            scores[i, layer] = delta * (weights[used, None] * grads[j][used]).sum(0)  # endpoints: no weight
            ig_total[i, layer] = scores[i, layer].sum()
            prob_delta[i, layer] = probs[j, -1] - probs[j, -2]
    return NeuronAttribution(scores, ig_total, prob_delta, chosen)


def _points(layers: list[int], alphas: Tensor, a_base: Tensor, a_in: Tensor) -> tuple[list[int], Tensor]:
    """Row layer indices and interpolated activations [rows, d_mlp], layer-major (row = j * K + k)."""
    row_layers = [layer for layer in layers for _ in range(len(alphas))]
    base, delta = a_base[layers], (a_in - a_base)[layers]  # [J, d]
    values = base[:, None] + alphas[None, :, None] * delta[:, None]  # [J, K, d]
    return row_layers, values.reshape(-1, a_in.shape[-1])


def _run_rows(
    model: HookedModel,
    forward,
    row_layers: list[int],
    values: Tensor,
    target: int,
    max_rows: int,
) -> tuple[Tensor, Tensor]:
    """Gradients dP/da [rows, d_mlp] and probabilities P [rows] for the points, `max_rows` at a time."""
    projections = down_projections(plain_model(model))
    grads, probs = [], []
    for start in range(0, len(row_layers), max_rows):
        chunk = row_layers[start : start + max_rows]
        leaf = values[start : start + len(chunk)].clone().to(model.device).requires_grad_(True)
        with _Replace(projections) as replace:
            for layer in sorted(set(chunk)):
                first = chunk.index(layer)
                last = len(chunk) - chunk[::-1].index(layer)
                replace.patches[layer] = (first, last, leaf[first:last])
            with torch.enable_grad():
                logits = forward(len(chunk))  # [rows, vocab] at the last position
                p = logits.float().softmax(-1)[:, target]
                (g,) = torch.autograd.grad(p.sum(), leaf)
        grads.append(g.float().cpu())
        probs.append(p.detach().float().cpu())
    return torch.cat(grads), torch.cat(probs)


def _cached_rows(model, ids, target, layers, a_base, a_in, alphas, max_rows) -> tuple[Tensor, Tensor]:
    plain = plain_model(model)
    with torch.no_grad():
        prefix = plain(torch.tensor([ids[:-1]], device=model.device), use_cache=True).past_key_values
    keys_values = [(prefix.layers[i].keys, prefix.layers[i].values) for i in range(len(prefix.layers))]
    last = torch.tensor([[ids[-1]]], device=model.device)

    def forward(rows: int) -> Tensor:
        cache = DynamicCache()
        for i, (k, v) in enumerate(keys_values):
            cache.update(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:]), i)
        return plain(last.expand(rows, 1), past_key_values=cache, use_cache=True).logits[:, -1]

    return _reshape(
        *_run_rows(model, forward, *_points(layers, alphas, a_base, a_in), target, max_rows), layers
    )


def _full_rows(model, ids, target, layers, a_base, a_in, alphas, max_rows) -> tuple[Tensor, Tensor]:
    plain = plain_model(model)
    full = torch.tensor([ids], device=model.device)

    def forward(rows: int) -> Tensor:
        return plain(full.expand(rows, -1)).logits[:, -1]

    return _reshape(
        *_run_rows(model, forward, *_points(layers, alphas, a_base, a_in), target, max_rows), layers
    )


def _reshape(grads: Tensor, probs: Tensor, layers: list[int]) -> tuple[Tensor, Tensor]:
    """-> grads [J, K, d_mlp], probs [J, K]."""
    j = len(layers)
    return grads.reshape(j, -1, grads.shape[-1]), probs.reshape(j, -1)
