"""Gradients at each head's q/k/v input, pulled back through the norm in front of attention.

Head h's q (k, v) input is the residual stream x seen through the norm and W_h alone, so its gradient is
J(x)^T W_h^T g_h, with g_h the gradient at the head's projection output. With integration steps stacked in
the batch, only the weighted sum over steps sum_k w_k J(x_k)^T W_h^T g_{k,h} is needed. For LayerNorm and
RMSNorm the closed form J^T u = r (u - mean(u) - x_hat mean(u x_hat)) (no mean(u) term for RMSNorm) lets
that sum be taken on the d_head-sized gradients: the d_model-sized per-head result is formed once, after
folding, instead of once per step. Other norm classes fall back to autograd (same result, more work).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Norms computing weight * x * (mean(x^2) + eps)^-1/2, in float32 at least.
RMS_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Phi3RMSNorm"}


def projected_norm_vjp(norm: nn.Module, x: Tensor, grads: Tensor, w: Tensor, weights: Tensor) -> Tensor:
    """sum_k weights[k] J(x_k)^T (W_n^T grads_k[..., n, :]) for each head n.

    Args:
        x: [K * b, P, d] the norm's inputs, step-major (row k * b + i).
        grads: [K * b, P, n, e] gradients at the heads' projection outputs (e = d_head).
        w: [n, e, d] per-head projection weights.
        weights: [K] step weights.
    Returns:
        [b, P, n, d] gradients at each head's input (float32, or float64 for float64 gradients).
    """
    centre = isinstance(norm, nn.LayerNorm) and norm.elementwise_affine
    if not centre and type(norm).__name__ not in RMS_NORMS:
        return _autograd_projected_vjp(norm, x, grads, w, weights)
    gamma: Tensor = norm.weight  # type: ignore[assignment]
    eps = float(norm.eps if centre else norm.variance_epsilon)  # type: ignore[arg-type]
    dtype = torch.promote_types(grads.dtype, torch.float32)
    k = weights.shape[0]
    x = x.to(dtype).reshape(k, -1, *x.shape[1:])  # [K, b, P, d]
    g = grads.to(dtype).reshape(k, -1, *grads.shape[1:])  # [K, b, P, n, e]
    w, gamma = w.to(dtype), gamma.to(dtype)
    d = x.shape[-1]

    centred = x - x.mean(-1, keepdim=True) if centre else x
    r = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)  # [K, b, P, 1]
    x_hat = centred * r
    wr = weights.to(x.device, dtype).reshape(k, 1, 1, 1) * r  # step weight x norm scale

    # r u term, with u = gamma * (W^T g): fold over steps on the small gradients first
    out = torch.einsum("bpne,ned->bpnd", (wr.unsqueeze(-1) * g).sum(0), w) * gamma
    # r x_hat mean(u x_hat) term: mean(u x_hat) = g . W (gamma x_hat) / d
    projected = torch.einsum("kbpd,ned->kbpne", x_hat * gamma, w)
    c2 = (g * projected).sum(-1) / d  # [K, b, P, n]
    out = out - torch.einsum("kbpn,kbpd->bpnd", wr * c2, x_hat)
    if centre:  # r mean(u) term: mean(u) = g . (W gamma) / d
        c1 = torch.einsum("kbpne,ne->kbpn", g, torch.einsum("ned,d->ne", w, gamma) / d)
        out = out - (wr * c1).sum(0).unsqueeze(-1)
    return out


def _autograd_projected_vjp(norm: nn.Module, x: Tensor, grads: Tensor, w: Tensor, weights: Tensor) -> Tensor:
    """Reference path: autograd through the norm on an expanded copy of x, then the weighted step sum."""
    grads_normed = torch.einsum("bpne,ned->bpnd", grads, w.to(grads.dtype))
    with torch.enable_grad():
        xs = x.detach().unsqueeze(2).expand_as(grads_normed).contiguous().requires_grad_(True)
        (full,) = torch.autograd.grad(norm(xs), xs, grads_normed)
    full = full.reshape(weights.shape[0], -1, *full.shape[1:])
    return (weights.to(full.device, full.dtype).reshape(-1, 1, 1, 1, 1) * full).sum(0)
