"""Gradients at each head's q/k/v input, pulled back through the norm in front of attention.

Head h's q (k, v) input is the residual stream x seen through the norm and W_h alone, so its gradient is
J(x)^T W_h^T g_h, with g_h the gradient at the head's projection output. With integration steps stacked in
the batch, only the weighted sum over steps sum_k w_k J(x_k)^T W_h^T g_{k,h} is needed. For LayerNorm and
RMSNorm the closed form J^T u = r (u - mean(u) - x_hat mean(u x_hat)) (no mean(u) term for RMSNorm) lets
that sum be taken on the d_head-sized gradients: the d_model-sized per-head result is formed once, after
folding, by one matmul per head and one in-place update. Which form a norm module has is verified
numerically, not read from its class; any other norm falls back to autograd (same result, more work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from circuits.errors import UnsupportedModelError

_EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")


@dataclass(frozen=True)
class NormForm:
    """What a norm module computes, found numerically: gain * x_hat + bias, with
    x_hat = (x - centre * mean(x)) * (mean((x - centre * mean(x))^2) + eps)^-1/2."""

    centre: bool  # LayerNorm (True) or RMSNorm (False)
    gain: Tensor  # [d]
    eps: float


def norm_form(norm: nn.Module, d: int) -> NormForm | None:
    """The closed form `norm` computes, or None if none of the candidates reproduces it on a probe.

    Candidates: LayerNorm or RMSNorm, with the module's own eps attribute (or, without one, the usual
    1e-5 and 1e-6) and a gain of `weight`, `1 + weight` (Gemma, Nemotron) or ones. Each is checked against
    the module's output on random inputs of scales 1e-3 to 10 (where a wrong eps shows), so the choice
    rests on what the module computes, never on its class.
    """
    eps = next((getattr(norm, a) for a in _EPS_ATTRIBUTES if isinstance(getattr(norm, a, None), float)), None)
    param = next(norm.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    if not dtype.is_floating_point:
        return None
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 1, 8, dtype=torch.float64)[:, None]
    x = torch.randn(8, d, generator=gen, dtype=torch.float64) * scales + 0.5 * scales
    with torch.no_grad():
        got = norm(x.to(device, dtype)).double()
    weight = getattr(norm, "weight", None)
    gains = [torch.ones(d, dtype=torch.float64, device=device)]
    if isinstance(weight, Tensor) and weight.shape == (d,):
        gains = [weight.detach().double(), 1 + weight.detach().double(), *gains]
    rtol = 1e-4 if torch.finfo(dtype).bits >= 32 else 2e-2
    x = x.to(device)
    for centre in (True, False):
        c = x - x.mean(-1, keepdim=True) if centre else x
        for candidate in [eps] if eps is not None else [1e-5, 1e-6]:
            x_hat = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + candidate)
            for gain in gains:
                want = gain * x_hat
                bias = (got - want).mean(0)  # zero for bias-free norms
                if ((got - want - bias).abs().amax(-1) <= rtol * got.abs().amax(-1).clamp_min(1e-6)).all():
                    return NormForm(centre, gain.to(dtype), float(candidate))
    return None


def with_frozen_scale(form: NormForm, x: Tensor, y: Tensor) -> Tensor:
    """The norm's output y (computed from x) with the gradient of gain * centre(x) * r(x), r held constant:
    RelP's LN rule (the normalising scale a constant in the backward pass), the forward value untouched."""
    xf = x.float()
    c = xf - xf.mean(-1, keepdim=True) if form.centre else xf
    r = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + form.eps).detach()
    s = c * (r * form.gain.to(x.device, torch.float32))
    return y.detach() + (s - s.detach()).to(y.dtype)


def norm_jvp(form: NormForm, x: Tensor, dx: Tensor) -> Tensor:
    """J(x) dx for the norm `form` describes: gain r (c(dx) - x_hat mean(x_hat c(dx))), c the centring
    (LayerNorm) or identity (RMSNorm); x [..., d], dx broadcastable to it."""
    c = x - x.mean(-1, keepdim=True) if form.centre else x
    r = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + form.eps)
    x_hat = c * r
    dc = dx - dx.mean(-1, keepdim=True) if form.centre else dx
    return form.gain.to(dx) * r * (dc - x_hat * (x_hat * dc).mean(-1, keepdim=True))


class ProjectedNorm:
    """A norm followed by per-head projections w [n, e, d] (e = d_head): the pull-back for all heads.

    Where the norm is a LayerNorm or RMSNorm (`norm_form`), its gain is folded into the projections once,
    here (and, for LayerNorm, the mean(u) term: it is linear in the gradients, so centring gain * W over d
    removes it, and it leaves g . W (gain x_hat) unchanged since x_hat sums to zero). Other norms go
    through autograd.
    """

    def __init__(self, norm: nn.Module, w: Tensor) -> None:
        self.norm, self.w = norm, w
        self.form = norm_form(norm, w.shape[-1])
        self.folded: Tensor | None = None
        if self.form is not None:
            self.centre, self.eps = self.form.centre, self.form.eps
            dtype = torch.promote_types(w.dtype, torch.float32)
            folded = w.detach().to(dtype) * self.form.gain.to(w.device, dtype)  # [n, e, d]
            self.folded = folded - folded.mean(-1, keepdim=True) if self.centre else folded

    def vjp(
        self,
        x: Tensor,
        grads: Tensor,
        weights: Tensor,
        out: Tensor | None = None,
        frozen_scale: bool = False,
    ) -> Tensor:
        """sum_k weights[k] J(x_k)^T (W_n^T grads_k[..., n, :]) for each head n.

        With `frozen_scale` (RelP's LN rule) J treats the norm's scale r as a constant: J^T u = r u (centred
        for LayerNorm), the x_hat term dropped.

        Args:
            x: [K * b, P, d] the norm's inputs, step-major (row k * b + i).
            grads: [K * b, P, n, e] gradients at the heads' projection outputs.
            weights: [K] step weights.
            out: optional contiguous [n, b * P, d] storage for the result (its dtype is used throughout).
        Returns:
            [b, P, n, d] gradients at each head's input (float32, or float64 for float64 gradients), a
            view of head-major storage [n, b, P, d] (what the edge scorer multiplies with, without a copy).
        """
        if self.folded is None:
            if frozen_scale and not isinstance(self.norm, nn.Identity):
                raise UnsupportedModelError(
                    "the attention norm is neither a LayerNorm nor an RMSNorm: its scale cannot be frozen"
                )
            result = _autograd_projected_vjp(self.norm, x, grads, self.w, weights)  # [b, P, n, d]
            if out is None:
                return result
            head_major = out.view(result.shape[2], *result.shape[:2], -1)
            return head_major.copy_(result.permute(2, 0, 1, 3)).permute(1, 2, 0, 3)
        dtype = out.dtype if out is not None else torch.promote_types(grads.dtype, torch.float32)
        k = weights.shape[0]
        x = x.to(dtype).reshape(k, -1, *x.shape[1:])  # [K, b, P, d]
        g = grads.to(dtype).reshape(k, -1, *grads.shape[1:])  # [K, b, P, n, e]
        _, b, p, n, e = g.shape
        d = x.shape[-1]
        w = self.folded.to(dtype)
        centred = x - x.mean(-1, keepdim=True) if self.centre else x
        r = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)  # [K, b, P, 1]
        x_hat = (centred * r).reshape(k, b * p, d)
        wr = weights.to(x.device, dtype).reshape(k, 1, 1, 1) * r  # step weight x norm scale

        # r u term, folded over steps on the small gradients first: one matmul per head
        folded = (wr.unsqueeze(-1) * g).sum(0).reshape(b * p, n, e)
        out = torch.bmm(folded.transpose(0, 1), w, out=None if out is None else out.view(n, b * p, d))
        if frozen_scale:
            return out.view(n, b, p, d).permute(1, 2, 0, 3)
        # r x_hat mean(u x_hat) term, mean(u x_hat) = g . W (gamma x_hat) / d, subtracted in place. With one
        # step, r g . W (gamma x_hat) is what the matmul above gave, dotted with x_hat: no second matmul.
        if k == 1:
            coef = torch.einsum("nqd,qd->nq", out, x_hat[0]) / d
            out.addcmul_(coef.unsqueeze(-1), x_hat[0].unsqueeze(0), value=-1.0)
        else:
            projected = torch.einsum("kqd,ned->kqne", x_hat, w)
            c2 = (g.reshape(k, b * p, n, e) * projected).sum(-1) / d  # [K, b * P, n]
            out.sub_(torch.einsum("kqn,kqd->nqd", wr.reshape(k, b * p, 1) * c2, x_hat))
        return out.view(n, b, p, d).permute(1, 2, 0, 3)


def _autograd_projected_vjp(norm: nn.Module, x: Tensor, grads: Tensor, w: Tensor, weights: Tensor) -> Tensor:
    """Reference path: autograd through the norm on an expanded copy of x, then the weighted step sum."""
    grads_normed = torch.einsum("bpne,ned->bpnd", grads, w.to(grads.dtype))
    with torch.enable_grad():
        xs = x.detach().unsqueeze(2).expand_as(grads_normed).contiguous().requires_grad_(True)
        (full,) = torch.autograd.grad(norm(xs), xs, grads_normed)
    full = full.reshape(weights.shape[0], -1, *full.shape[1:])
    return (weights.to(full.device, full.dtype).reshape(-1, 1, 1, 1, 1) * full).sum(0)


class HeadsNorm:
    """A norm over all heads' projection outputs together, after the projection (OLMo-2, OLMoE,
    MiniMax-M2: q_h = slice_h N(y), y = W n(x) + b of width D = n * e): its pull-back for each head.

    For a LayerNorm or RMSNorm N (`norm_form`), the gradient g_h at head h's slice of N's output pulls
    back to y as J_N^T (e_h g_h) = r (e_h u_h - m_h 1 - c_h y_hat), u_h = gain_h * g_h, m_h = sum(u_h) / D
    (LayerNorm only), c_h = y_hat_h . u_h / D. So W^T of it is W_h^T (r u_h) (what `ProjectedNorm` does
    for a head-separable projection) plus two terms shared by all heads up to a per-head coefficient:
    -r m_h W^T 1 and -r c_h W^T y_hat. With the scale frozen (RelP's LN rule) the c_h term drops.
    """

    def __init__(self, norm: nn.Module, width: int) -> None:
        self.norm = norm
        self.form = norm_form(norm, width)

    def pull_back(
        self, y: Tensor, grads: Tensor, w: Tensor, frozen_scale: bool = False
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """(grads for the projection slices, [(coefficients, vector)]): the gradient at the projection's
        input for head h is W_h^T grads'[..., h, :] + sum over terms of coefficients[..., h] * vector.

        Args:
            y: [rows, P, D] the projection's output (N's input).
            grads: [rows, P, n, e] gradients at each head's slice of N's output.
            w: [n, e, d] the projection's per-head weights.
        Returns:
            grads' [rows, P, n, e]; each term: coefficients [rows, P, n], vector [rows, P, d] (float32 or
            wider).
        """
        form = self.form
        assert form is not None, "HeadsNorm.pull_back needs a LayerNorm or RMSNorm (see `form`)"
        dtype = torch.promote_types(grads.dtype, torch.float32)
        y, g = y.to(dtype), grads.to(dtype)
        rows, p, n, e = g.shape
        width = n * e
        centred = y - y.mean(-1, keepdim=True) if form.centre else y
        r = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + form.eps)  # [rows, P, 1]
        u = g * form.gain.to(y.device, dtype).view(n, e)
        w = w.to(dtype)
        terms: list[tuple[Tensor, Tensor]] = []
        if form.centre:
            m = u.sum(-1) / width  # [rows, P, n]
            ones = w.sum(1).sum(0)  # W^T 1 [d]
            terms.append((-r * m, ones.expand(rows, p, -1)))
        if not frozen_scale:
            y_hat = (centred * r).view(rows, p, n, e)
            c = (y_hat * u).sum(-1) / width
            terms.append((-r * c, torch.einsum("bpne,ned->bpd", y_hat, w)))
        return r.unsqueeze(-1) * u, terms
