"""Quadrature rules on [0, 1] for integrated gradients: points alpha_k and weights w_k, sum w_k = 1."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from circuits.errors import InputError

Quadrature = Literal["left", "midpoint", "trapezoid", "gauss-legendre"]
QUADRATURES: tuple[str, ...] = ("left", "midpoint", "trapezoid", "gauss-legendre")
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

    `left` is EAP-IG's grid alpha_k = k/m, k = 0..m-1 (the clean end point is never evaluated).
    """
    check_steps(steps, "steps")
    check_rule(rule)
    k = torch.arange(steps, dtype=torch.float64)
    if rule == "left":
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
