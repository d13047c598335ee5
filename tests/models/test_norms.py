"""Closed-form, step-folded norm pull-backs against autograd, one step at a time."""

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from circuits.models.norms import ProjectedNorm


class TanhNorm(nn.Module):
    """A norm with no closed form here: the autograd path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) / x.norm(dim=-1, keepdim=True)


class OnePlusLayerNorm(nn.LayerNorm):
    """Nemotron's norm: an nn.LayerNorm subclass that computes with gain weight + 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class MislabelledRMSNorm(LlamaRMSNorm):
    """Says eps 1e-6 but computes with 1e-1: no closed form may be trusted on its attributes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 0.1)


def _problem(steps: int, b: int = 2) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    x = torch.randn(steps * b, 4, 16, dtype=torch.float64) * 3 + 1
    grads = torch.randn(steps * b, 4, 5, 8, dtype=torch.float64)
    w = torch.randn(5, 8, 16, dtype=torch.float64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)[:steps]
    return x, grads, w, weights


def _by_hand(norm: nn.Module, x, grads, w, weights) -> torch.Tensor:
    """One autograd pull-back per step and head."""
    steps = weights.shape[0]
    b = x.shape[0] // steps
    expected = torch.zeros(b, 4, 5, 16, dtype=torch.float64)
    for k in range(steps):
        rows = slice(k * b, (k + 1) * b)
        for n in range(5):
            xk = x[rows].clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(norm(xk), xk, grads[rows, :, n] @ w[n])
            expected[:, :, n] += weights[k] * grad
    return expected


NORMS = [
    LlamaRMSNorm(16, eps=1e-5),
    nn.LayerNorm(16),
    OnePlusLayerNorm(16),
    MislabelledRMSNorm(16, 1e-6),
    TanhNorm(),
]
CLOSED_FORM = (LlamaRMSNorm, nn.LayerNorm)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("norm", NORMS, ids=lambda n: type(n).__name__)
def test_pull_back_matches_autograd(norm: nn.Module, steps: int) -> None:
    norm = norm.double()
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor):
        with torch.no_grad():
            weight.copy_(torch.randn(16))
    x, grads, w, weights = _problem(steps)
    expected = _by_hand(norm, x, grads, w, weights)
    projected = ProjectedNorm(norm, w)
    closed = isinstance(norm, CLOSED_FORM) and not isinstance(norm, MislabelledRMSNorm)
    assert (projected.folded is not None) == closed  # chosen by what the module computes
    tol = {"rtol": 1e-5, "atol": 1e-5}  # LlamaRMSNorm computes in float32 whatever its input
    torch.testing.assert_close(projected.vjp(x, grads, weights), expected, **tol)
    out = torch.empty(5, x.shape[0] // steps * 4 * 16, dtype=torch.float64)  # written in place, head-major
    torch.testing.assert_close(projected.vjp(x, grads, weights, out=out), expected, **tol)
    torch.testing.assert_close(out.view(5, -1, 4, 16).permute(1, 2, 0, 3), expected, **tol)
