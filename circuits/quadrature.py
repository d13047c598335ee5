"""Quadrature rules on [0, 1] for integrated gradients: points alpha_k and weights w_k, sum w_k = 1."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

Quadrature = Literal["left", "midpoint", "trapezoid", "gauss-legendre"]
QUADRATURES: tuple[str, ...] = ("left", "midpoint", "trapezoid", "gauss-legendre")


def quadrature(rule: str, steps: int) -> tuple[Tensor, Tensor]:
    """Points and weights (float64, [steps] each) of a rule on [0, 1].

    `left` is EAP-IG's grid alpha_k = k/m, k = 0..m-1 (the clean end point is never evaluated).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    k = torch.arange(steps, dtype=torch.float64)
    if rule == "left":
        return k / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "midpoint":
        return (k + 0.5) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "trapezoid":
        if steps < 2:
            raise ValueError("the trapezoid rule needs steps >= 2")
        weights = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        weights[[0, -1]] /= 2
        return k / (steps - 1), weights
    if rule == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)
    raise ValueError(f"unknown quadrature {rule!r}; choose one of {QUADRATURES}")
