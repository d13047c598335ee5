"""The additivity check: the edge graph is only meaningful if the model really is a sum of its parts.

On one batch it verifies, layer by layer:
1. the attention norm reads the residual stream (`ln1` input == resid_pre);
2. attention output == sum over heads of z_h W_O[h] + b_O (per-head additivity);
3. the MLP norm reads resid_pre + attn_out (sequential blocks) or resid_pre (parallel blocks);
4. resid_post == resid_pre + attn_out + mlp_out, and the next layer / final norm read resid_post;
5. q, k and v depend on the residual only through norm + one linear map per head: the per-head input
   gradients recovered through W_Q/W_K/W_V sum to the gradient autograd gives at the norm input.
A failure raises `AdditivityError` naming the hook and the size of the mismatch. Before it, `check_bridge`
verifies that the bridge computes the Hugging Face model it wraps (same logits).
"""

from __future__ import annotations

import torch
from torch import Tensor

from circuits.errors import UnsupportedModelError
from circuits.models.hooked import HookedModel
from circuits.models.plain import plain_model


class AdditivityError(UnsupportedModelError):
    """The model's activations are not the sums the edge graph assumes."""


def _close(model_name: str, name: str, got: Tensor, want: Tensor, rtol: float) -> None:
    scale = want.abs().max().item() + 1e-6
    err = (got - want).abs().max().item()
    if not err <= rtol * scale:
        raise AdditivityError(
            f"{model_name}: additivity check failed at {name}: max |difference| {err:.3g} vs max |value| "
            f"{scale:.3g}. "
            "This architecture (or its TransformerLens bridge adapter) does not expose activations that sum "
            "as the edge graph assumes, so edge scores would be wrong for it."
        )


def probe_ids(model: HookedModel) -> Tensor:
    """A fixed random batch [2, 7] of token ids for the load-time checks."""
    gen = torch.Generator().manual_seed(0)
    vocab = min(len(model.tokenizer), model.d_vocab)
    return torch.randint(0, vocab, (2, 7), generator=gen)


def check_bridge(model: HookedModel, input_ids: Tensor | None = None) -> None:
    """Raise `UnsupportedModelError` unless the bridge computes the Hugging Face model it wraps: its logits
    are compared with those of the un-bridged model (same parameters) on a probe batch."""
    ids = (probe_ids(model) if input_ids is None else input_ids).to(model.device)
    with torch.no_grad():
        ours = model(ids).float()
        theirs = plain_model(model)(ids).logits.float()
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    rtol = 1e-4 if ours.dtype == model.dtype == torch.float32 else 2e-2
    if not err <= rtol * max(scale, 1.0):
        raise UnsupportedModelError(
            f"{model.spec.name}: the TransformerLens bridge's logits differ from the Hugging Face model's by "
            f"up to {err:.3g} (largest |logit| {scale:.3g}) on a probe batch, so the bridge adapter for this "
            "architecture does not compute the model and no score read from it would be right. Report it to "
            "TransformerLens; load_model(..., check=False) skips the checks at your own risk"
        )


def check_additivity(model: HookedModel, input_ids: Tensor | None = None) -> None:
    """Raise `AdditivityError` unless the model decomposes as the graph assumes (see module doc)."""
    spec = model.spec
    input_ids = (probe_ids(model) if input_ids is None else input_ids).to(model.device)
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def save(name: str):
        def fn(x: Tensor) -> Tensor:
            # A fresh view, so that its gradient is the one of this branch alone (hook points return
            # the very tensor they get, which the residual stream also carries on).
            y = x.view_as(x)
            acts[name] = y.detach()
            if y.requires_grad:
                y.register_hook(lambda g: grads.__setitem__(name, g.detach()))
            return y

        return fn

    names = [model.final_norm_in_hook]
    for layer in range(spec.n_layers):
        names += [
            model.resid_pre_hook(layer),
            model.resid_post_hook(layer),
            model.attn_out_hook(layer),
            model.mlp_out_hook(layer),
            model.head_z_hook(layer),
            model.attn_norm_in_hook(layer),
            model.mlp_norm_in_hook(layer),
            *(model.qkv_out_hook(layer, letter) for letter in "qkv"),  # type: ignore[arg-type]
        ]

    def make_leaf(x: Tensor) -> Tensor:
        return x.detach().requires_grad_(True)

    hooks = [(model.input_hook, make_leaf)] + [(n, save(n)) for n in names]
    with torch.enable_grad(), model.hooks(hooks):
        logits = model(input_ids)
        logits.float().pow(2).mean().backward()

    unreached = [name for name in names if name not in acts]
    if unreached:
        raise AdditivityError(
            f"{spec.name}: hook points the graph reads were never reached in a forward pass "
            f"({', '.join(unreached[:4])}{', ...' if len(unreached) > 4 else ''}): the bridge does not route "
            "this architecture's computation through them, so its edges cannot be read"
        )
    rtol = 1e-4 if logits.dtype == torch.float32 else 2e-2
    for layer in range(spec.n_layers):
        pre, post = acts[model.resid_pre_hook(layer)], acts[model.resid_post_hook(layer)]
        attn, mlp = acts[model.attn_out_hook(layer)], acts[model.mlp_out_hook(layer)]
        _close(spec.name, model.attn_norm_in_hook(layer), acts[model.attn_norm_in_hook(layer)], pre, rtol)
        z = acts[model.head_z_hook(layer)]
        z = z.reshape(*z.shape[:2], spec.n_heads, spec.d_head)
        heads = torch.einsum("bpnh,nhd->bpd", z, model.W_O(layer))
        b_o = model.b_O(layer)
        _close(spec.name, model.attn_out_hook(layer), attn, heads if b_o is None else heads + b_o, rtol)
        mlp_in = pre if spec.parallel_attn_mlp else pre + attn
        _close(spec.name, model.mlp_norm_in_hook(layer), acts[model.mlp_norm_in_hook(layer)], mlp_in, rtol)
        _close(spec.name, model.resid_post_hook(layer), post, pre + attn + mlp, rtol)
        following = model.resid_pre_hook(layer + 1) if layer + 1 < spec.n_layers else model.final_norm_in_hook
        _close(spec.name, following, acts[following], post, rtol)

        resid = acts[model.attn_norm_in_hook(layer)]
        per_head = [grads[model.qkv_out_hook(layer, letter)] for letter in ("q", "k", "v")]
        total = model.attn_input_grads(layer, resid, per_head).sum(2)
        _close(
            spec.name,
            f"{model.attn_norm_in_hook(layer)} (gradient through per-head q/k/v)",
            total,  # type: ignore[arg-type]
            grads[model.attn_norm_in_hook(layer)],
            rtol * 10,
        )
