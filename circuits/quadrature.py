"""Quadrature rules on [0, 1] for integrated gradients: points alpha_k and weights w_k, sum w_k = 1; and
IDGI (Yang et al., CVPR 2023, arXiv 2303.14242), which spends each step's exact change of f along the
gradient instead of weighting gradients.

IDGI runs on the left grid alpha_k = k/m (k = 0..m-1) plus the end point alpha_m = 1: between consecutive
points the change f(alpha_{k+1}) - f(alpha_k) is known from the forward passes, and feature i receives the
share g_{k,i}^2 / ||g_k||^2 of it (g_k the gradient at alpha_k). The shares sum to 1, so the attributions
sum to f(1) - f(0) exactly for any m (completeness by construction). It applies where one tensor is
integrated (token IG over embeddings, neuron IG over one layer's activations); edge scores are not a
decomposition of f (completeness holds on each cut of the graph, and one share per step cannot honour
every cut at once), so `attribute` refuses it.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from circuits.errors import CircuitsWarning, InputError

Quadrature = Literal["left", "midpoint", "trapezoid", "gauss-legendre", "idgi"]
QUADRATURES: tuple[str, ...] = ("left", "midpoint", "trapezoid", "gauss-legendre", "idgi")
EDGE_QUADRATURES: tuple[str, ...] = QUADRATURES[:-1]  # the rules edge scores take (no IDGI: see above)
MAX_STEPS = 1024
# The most integration steps accepted: each costs a forward/backward pass per batch, and Gauss-Legendre's
# nodes cost memory in its square. Set `circuits.quadrature.MAX_STEPS` higher to go further on purpose.


def check_steps(steps: object, name: str = "ig_steps") -> int:
    """`steps` as an int in [1, MAX_STEPS], else `InputError` saying what is accepted."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise InputError(f"{name} must be a whole number of steps, got {steps!r} ({type(steps).__name__})")
    if steps < 1:
        raise InputError(f"{name} must be >= 1, got {steps}")
    if steps > MAX_STEPS:
        raise InputError(
            f"{name}={steps} is above the limit of {MAX_STEPS} steps (each step is a forward and backward "
            "pass per batch); to go higher on purpose, set circuits.quadrature.MAX_STEPS"
        )
    return steps


def check_rule(rule: object) -> str:
    """`rule` if it names a rule of `QUADRATURES`, else `InputError` listing them."""
    if rule not in QUADRATURES:
        raise InputError(f"unknown quadrature {rule!r}; choose one of {', '.join(QUADRATURES)}")
    return rule  # type: ignore[return-value]


def quadrature(rule: str, steps: int) -> tuple[Tensor, Tensor]:
    """Points and weights (float64, [steps] each) of a rule on [0, 1].

    `left` is EAP-IG's grid alpha_k = k/m, k = 0..m-1 (the clean end point is never evaluated); `idgi`
    uses the same points (its weights are those of `left`, for the parts that still average gradients).
    """
    check_steps(steps, "steps")
    check_rule(rule)
    k = torch.arange(steps, dtype=torch.float64)
    if rule in ("left", "idgi"):
        return k / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "midpoint":
        return (k + 0.5) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "trapezoid":
        if steps < 2:
            raise InputError("the trapezoid rule needs steps >= 2")
        weights = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        weights[[0, -1]] /= 2
        return k / (steps - 1), weights
    if rule == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)
    raise AssertionError(f"check_rule let {rule!r} through")


def idgi(grads: Tensor, values: Tensor) -> Tensor:
    """IDGI attributions sum_k (g_k^2 / ||g_k||^2) (f(alpha_{k+1}) - f(alpha_k)), in float64.

    Args:
        grads: [..., K, F] gradients at the left-grid points alpha_k = k/K, the features last.
        values: [..., K + 1] f at alpha_0, ..., alpha_K (alpha_K = 1, the input).
    Returns:
        [..., F]; summed over the features, exactly f(1) - f(0). A step whose gradient is zero (it has no
        direction) spreads its change evenly over the features, so that completeness still holds.
    """
    if values.shape[-1] != grads.shape[-2] + 1:
        raise InputError(f"IDGI needs f at {grads.shape[-2] + 1} points, got {values.shape[-1]}")
    square = grads.double().pow(2)
    norm = square.sum(-1, keepdim=True)
    share = torch.where(
        norm > 0, square / norm.clamp_min(torch.finfo(torch.float64).tiny), 1 / grads.shape[-1]
    )
    return (share * values.double().diff(dim=-1).unsqueeze(-1)).sum(-2)


COMPLETENESS_TOLERANCE = 0.1  # IG's relative completeness error above which a warning says so


def warn_if_incomplete(relative_error: float, report: str, advice: str, stacklevel: int = 3) -> None:
    """A `CircuitsWarning` when IG's scores sum to more than `COMPLETENESS_TOLERANCE` off the change they
    explain: `report` says what was measured, `advice` what to do (more steps, another rule)."""
    if relative_error > COMPLETENESS_TOLERANCE:
        warnings.warn(
            f"IG {report}: the scores sum to {relative_error:.0%} off the change they explain (more than "
            f"{COMPLETENESS_TOLERANCE:.0%}). {advice}",
            CircuitsWarning,
            stacklevel=stacklevel + 1,
        )
