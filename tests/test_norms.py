"""Closed-form, step-folded norm pull-backs against autograd, one step at a time."""

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from circuits.models.norms import _autograd_projected_vjp, projected_norm_vjp


@pytest.mark.parametrize("norm", [LlamaRMSNorm(16, eps=1e-5), nn.LayerNorm(16)])
def test_closed_form_matches_autograd(norm: nn.Module) -> None:
    torch.manual_seed(0)
    norm = norm.double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    steps, b = 3, 2
    x = torch.randn(steps * b, 4, 16, dtype=torch.float64) * 3 + 1
    grads = torch.randn(steps * b, 4, 5, 8, dtype=torch.float64)
    w = torch.randn(5, 8, 16, dtype=torch.float64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    expected = torch.zeros(b, 4, 5, 16, dtype=torch.float64)
    by_hand = expected  # one autograd pull-back per step and head
    for k in range(steps):
        rows = slice(k * b, (k + 1) * b)
        for n in range(5):
            xk = x[rows].clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(norm(xk), xk, grads[rows, :, n] @ w[n])
            by_hand[:, :, n] += weights[k] * grad
    tol = {"rtol": 1e-5, "atol": 1e-5}  # LlamaRMSNorm computes in float32 whatever its input
    torch.testing.assert_close(projected_norm_vjp(norm, x, grads, w, weights), by_hand, **tol)
    torch.testing.assert_close(_autograd_projected_vjp(norm, x, grads, w, weights), by_hand, **tol)
