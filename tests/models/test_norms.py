"""Closed-form, step-folded norm pull-backs against autograd, one step and one head at a time."""

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from circuits import load_model
from circuits.models.norms import HeadsNorm, ProjectedNorm
from circuits.testing import tiny_tokenizer
from tests.architectures import ARCHITECTURES


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


def _frozen(norm: nn.Module):
    """The norm with its scale held constant, written by hand (RelP's LN rule)."""
    layer_norm = isinstance(norm, nn.LayerNorm)
    eps = float(norm.eps if layer_norm else norm.variance_epsilon)  # type: ignore[arg-type]
    weight: torch.Tensor = norm.weight  # type: ignore[assignment]

    def forward(y: torch.Tensor) -> torch.Tensor:
        c = y - y.mean(-1, keepdim=True) if layer_norm else y
        return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps).detach() * weight

    return forward


@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen scale"])
@pytest.mark.parametrize(
    "norm", [LlamaRMSNorm(40, eps=1e-5), nn.LayerNorm(40)], ids=lambda n: type(n).__name__
)
def test_a_norm_over_all_heads_pulls_back_per_head_as_autograd_does(norm: nn.Module, frozen: bool) -> None:
    """HeadsNorm: head h's gradient through N over all 5 heads' projections (width 40) and W, one autograd
    pull-back per head by hand (with the scale detached by hand for the frozen form)."""
    norm = norm.double()
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(40))  # type: ignore[operator]
    y = torch.randn(3, 4, 40, dtype=torch.float64) * 2 + 0.5
    grads = torch.randn(3, 4, 5, 8, dtype=torch.float64)
    w = torch.randn(5, 8, 16, dtype=torch.float64)
    heads_norm = HeadsNorm(norm, 40)
    assert heads_norm.form is not None
    scaled, terms = heads_norm.pull_back(y, grads, w, frozen_scale=frozen)
    got = torch.einsum("bpne,ned->bpnd", scaled, w)
    for coefficients, vector in terms:
        got = got + coefficients.unsqueeze(-1) * vector.unsqueeze(2)
    forward = _frozen(norm) if frozen else norm
    expected = torch.zeros_like(got)
    for head in range(5):
        cotangent = torch.zeros(3, 4, 5, 8, dtype=torch.float64)
        cotangent[:, :, head] = grads[:, :, head]
        leaf = y.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(forward(leaf), leaf, cotangent.flatten(2))
        expected[:, :, head] = grad @ w.reshape(40, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # LlamaRMSNorm rounds via float32
    assert HeadsNorm(TanhNorm(), 40).form is None  # no closed form: the model takes autograd instead


@pytest.mark.parametrize("name", ["olmo2", "minimax_m2", "qwen3_5_text"])
def test_q_k_v_input_gradients_in_closed_form_are_autograds_through_each_head(name: str) -> None:
    """`attn_input_grads` with q/k norms over all heads (OLMo-2, MiniMax-M2, grouped-query) or a q
    projection that also computes the output gates (Qwen3.5: widths 2 d_head and d_head) against the
    generic path: autograd through `qkv_from_residual` on a copy of the residual per head, 3 steps."""
    arch = next(a for a in ARCHITECTURES if a.name == name)
    model = load_model(arch.build(), tiny_tokenizer())
    spec = model.spec
    torch.manual_seed(1)
    resid = torch.randn(3 * 2, 5, spec.d_model)
    grads = [torch.randn(3 * 2, 5, spec.n_qkv_heads(x) * model.qkv_width(1, x)) for x in "qkv"]  # type: ignore[arg-type]
    weights = torch.tensor([0.2, 0.5, 0.3])
    if name == "qwen3_5_text":
        assert (model.qkv_width(1, "q"), model.qkv_width(1, "k")) == (2 * spec.d_head, spec.d_head)
    else:
        assert model.head_input_norm(1, "q") is not None and model.head_input_norm(1, "k") is not None
    closed = model.attn_input_grads(1, resid, grads, weights)
    model.closed_form_pullbacks = False
    generic = model.attn_input_grads(1, resid, grads, weights)
    torch.testing.assert_close(closed, generic, rtol=1e-4, atol=1e-6)
    assert float(closed.abs().max()) > 1e-2
