"""GrAInS steering vectors and the norm-preserving steering hook (GrAInS: Nguyen et al.
2025, gradient-based attribution for inference-time steering).

For each (prompt, preferred, dispreferred) pair: contrastive token IG picks the k most positive and the k
most negative prompt tokens (never BOS); replacing each set by the pad (or eos) token and recording the
residual stream at the last prompt token after every layer gives differences h(original) - h(ablated).
Per layer the direction is the first principal component of those differences over pairs, its sign aligned
with their mean (or the mean itself). mode "both" uses v_pos - v_neg, mode "pos" v_pos alone.

Steering adds strength x v at the chosen layers' outputs at every position and rescales each token back to
its original norm: h' = (h + s v) ||h|| / ||h + s v||.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm import tqdm

from circuits.errors import InputError, NumericalError
from circuits.models.hooked import HookedModel, HookFn, uses_model
from circuits.quadrature import COMPLETENESS_TOLERANCE
from circuits.steering.token_ig import contrastive_token_ig, token_options, warn_incomplete_tokens


@dataclass
class SteeringVectors:
    vectors: dict[int, Tensor]  # layer -> [d_model] unit direction
    layers: list[int]
    top_tokens: list[tuple[list[str], list[str]]]  # per pair: (most positive, most negative) tokens


def pc1_aligned(diffs: Tensor) -> Tensor:
    """First principal component of the rows of `diffs` [n, d], with the sign of their mean; unit length."""
    mean = diffs.mean(0)
    centred = diffs - mean
    _, _, vt = torch.linalg.svd(centred.double(), full_matrices=False)
    pc = vt[0].to(diffs.dtype)
    if float(pc @ mean) < 0:
        pc = -pc
    return pc / pc.norm()


def _last_residuals(model: HookedModel, ids: list[int], layers: list[int]) -> Tensor:
    """[len(layers), d_model] residual stream after each layer at the last position."""
    names = [model.resid_post_hook(layer) for layer in layers]
    with torch.no_grad(), model.capture(names) as captured:
        model(torch.tensor([ids], device=model.device))
    # from each layer's device
    return torch.stack([captured[name][0, -1].float().to(model.device) for name in names])


def _check_layers(model: HookedModel, layers: Sequence[int]) -> list[int]:
    chosen = sorted(set(layers))
    if not chosen or any(not 0 <= layer < model.spec.n_layers for layer in chosen):
        raise InputError(
            f"layers must be a non-empty subset of 0..{model.spec.n_layers - 1}, got {list(layers)}"
        )
    return chosen


@uses_model
def steering_vectors(
    model: HookedModel,
    pairs: Sequence[tuple[str, str, str]],
    layers: Sequence[int],
    *,
    k: int = 5,
    mode: Literal["both", "pos"] = "both",
    method: Literal["pca", "mean"] = "pca",
    quiet: bool = False,
    **ig_options: Any,
) -> SteeringVectors:
    """Directions per layer from (prompt, preferred, dispreferred) pairs (see the module docstring)."""
    if not pairs:
        raise InputError("no pairs to fit steering vectors on")
    if mode not in ("both", "pos") or method not in ("pca", "mean"):
        raise InputError(f"mode must be 'both' or 'pos' and method 'pca' or 'mean', got {mode!r}, {method!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k (tokens per side) must be a whole number >= 1, got {k!r}")
    chosen = _check_layers(model, layers)
    if method == "pca" and len(pairs) < 2:
        raise InputError(
            f"a first principal component needs at least 2 pairs, got {len(pairs)}; give more pairs or "
            "use method='mean'"
        )
    filler = model.tokenizer.pad_token_id
    filler = model.tokenizer.eos_token_id if filler is None else filler
    start = 1 if model.prepend_bos else 0
    pos_diffs: list[Tensor] = []
    neg_diffs: list[Tensor] = []
    top_tokens: list[tuple[list[str], list[str]]] = []
    misses: list[float] = []  # relative completeness errors above the tolerance, reported once
    for prompt, preferred, dispreferred in tqdm(pairs, desc="steering vectors", disable=quiet):
        attribution = contrastive_token_ig(model, prompt, preferred, dispreferred, warn=False, **ig_options)
        if attribution.relative_error > COMPLETENESS_TOLERANCE:
            misses.append(attribution.relative_error)
        ids = model.to_ids([prompt])[0]
        scores = attribution.scores[start:]
        n = min(k, len(scores))
        positive = (scores.topk(n).indices + start).tolist()
        negative = ((-scores).topk(n).indices + start).tolist()
        original = _last_residuals(model, ids, chosen)
        for picked, out in ((positive, pos_diffs), (negative, neg_diffs)):
            ablated = [filler if i in picked else t for i, t in enumerate(ids)]
            out.append(original - _last_residuals(model, ablated, chosen))
        top_tokens.append(
            ([attribution.tokens[i] for i in positive], [attribution.tokens[i] for i in negative])
        )
    if misses:
        warn_incomplete_tokens(
            max(misses),
            f"contrastive token attributions of {len(misses)} of the {len(pairs)} pairs the tokens to "
            "ablate were chosen from (the worst shown)",
            token_options(None, ig_options),
        )
    pos, neg = torch.stack(pos_diffs), torch.stack(neg_diffs)  # [n_pairs, n_layers, d]
    direction = pc1_aligned if method == "pca" else (lambda d: d.mean(0) / d.mean(0).norm())
    vectors = {}
    for j, layer in enumerate(chosen):
        v = direction(pos[:, j]) - (direction(neg[:, j]) if mode == "both" else 0)
        vectors[layer] = v / v.norm()
    return SteeringVectors(vectors, chosen, top_tokens)


@contextmanager
def steer(
    model: HookedModel,
    vectors: SteeringVectors | dict[int, Tensor],
    strength: float,
    layers: Sequence[int] | None = None,
    *,
    compat: str | None = None,
) -> Iterator[None]:
    """Within the block, add `strength` x v at each chosen layer's output, every position, keeping each
    token's norm. compat="grains-code" normalises over the sequence axis instead (the released code)."""
    table = vectors.vectors if isinstance(vectors, SteeringVectors) else vectors
    chosen = _check_layers(model, layers if layers is not None else list(table))
    missing = [layer for layer in chosen if layer not in table]
    if missing:
        raise InputError(f"no steering vector for layers {missing}; have {sorted(table)}")
    if compat not in (None, "grains-code"):
        raise InputError(f"unknown compat {compat!r}; the only one is 'grains-code'")
    d = model.spec.d_model
    for layer in chosen:
        v = table[layer]
        if not isinstance(v, Tensor) or v.shape != (d,):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise InputError(
                f"the steering vector of layer {layer} must have shape ({d},) (d_model), got {got}"
            )
        if not bool(v.isfinite().all()):
            raise NumericalError(f"the steering vector of layer {layer} has NaN or infinite entries")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise InputError(f"strength must be a finite number, got {strength!r}")
    dim = 1 if compat == "grains-code" else -1

    def hook_for(v: Tensor) -> HookFn:
        def hook(h: Tensor) -> Tensor:
            steered = h + strength * v.to(h)
            return steered * h.norm(dim=dim, keepdim=True) / steered.norm(dim=dim, keepdim=True)

        return hook

    with model.hooks([(model.resid_post_hook(layer), hook_for(table[layer])) for layer in chosen]):
        yield


@uses_model
def generate(model: HookedModel, prompt: str, max_new_tokens: int = 30) -> str:
    """Greedy continuation of `prompt` (hooks active at the call site apply, e.g. inside `steer`)."""
    ids = model.to_ids([prompt])[0]
    eos = model.tokenizer.eos_token_id
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + new], device=model.device))
            token = int(logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
    return str(model.tokenizer.decode(new))
