"""The additivity check: the edge graph is only meaningful if the model really is a sum of its parts.

On one batch it verifies, layer by layer:
1. the attention norm reads the residual stream (`ln1` input == resid_pre);
2. attention output == sum over heads of z_h W_O[h] + b_O (per-head additivity);
3. the MLP norm reads resid_pre + attn_out (sequential blocks) or resid_pre (parallel blocks); an MLP
   sharing the attention norm reads norm(resid_pre);
4. resid_post == resid_pre + attn_out + mlp_out, and the next layer / final norm read resid_post;
5. q, k and v depend on the residual only through norm + one linear map per head: the per-head input
   gradients recovered through W_Q/W_K/W_V (plus, with a shared norm, the MLP's) sum to the gradient
   autograd gives at the norm input.
A failure raises `AdditivityError` naming the hook and the size of the mismatch. Before it, `check_bridge`
verifies that the bridge computes the Hugging Face model it wraps (same logits).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from circuits.errors import UnsupportedModelError
from circuits.models.hooked import QKV, QKV_LETTERS, HookedModel, HookFn
from circuits.models.plain import plain_model
from circuits.models.wiring import wiring

HALF_PRECISION_EPS = 8  # check_bridge: relative RMS difference allowed in half precision, in epsilon


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


def unhandled_features(model: HookedModel) -> str | None:
    """The block features the graph does not express yet, named from the Hugging Face model it wraps (all
    of them, joined by "; and "), or None.

    Each is an exact intervention in principle; these say which piece is missing, so that a refusal names
    the cause instead of the first hook or sum that comes out wrong.
    """
    hf = model.bridge.original_model
    config = hf.config
    modules = dict(hf.named_modules())
    attention = [m for name, m in modules.items() if name.endswith("self_attn")]
    reasons = []
    gates = [name for m in attention for name in ("gate_proj", "g_proj") if hasattr(m, name)]
    if gates and any(model.head_gate_hook(layer) is None for layer in model.spec.attention_layers):
        reasons.append(
            f"each head's output is multiplied by a gate its own projection (`self_attn.{gates[0]}`) "
            "computes from the residual, and the bridge has no hook point on that projection (`attn.gate`) "
            "where the gates could be patched with the queries"
        )
    for layer in model.spec.attention_layers:
        if model.head_gate_hook(layer) is not None and model.head_input_norm(layer, "q") is not None:
            reasons.append(
                f"layer {layer}'s heads have output gates from a projection of their own and a q norm over "
                "all heads: head h's q input then feeds both through different maps, not written here"
            )
            break
    if any(getattr(m, "k_proj", None) is not None and getattr(m, "v_proj", 0) is None for m in attention):
        reasons.append(
            "some layers take their values from the key projection (Gemma-4's attention_k_eq_v): one "
            "projection feeds both a head's k and v inputs, which the graph keeps apart"
        )
    shapes = {(getattr(m, "head_dim", None), _out_width(getattr(m, "k_proj", None))) for m in attention}
    if len(shapes) > 1:
        reasons.append(
            f"the layers' attention differs in head width or key/value heads ({sorted(shapes, key=str)}: "
            "Gemma-4's full-attention layers): the graph has one head width and one key/value head count"
        )
    if getattr(config, "hidden_size_per_layer_input", 0):
        reasons.append(
            "per-layer inputs (Gemma-3n, Gemma-4: a second embedding of the tokens enters every layer "
            "through its own gate): no input node per layer yet"
        )
    if getattr(config, "num_kv_shared_layers", 0):
        reasons.append(
            "the last layers reuse the keys and values of earlier layers (num_kv_shared_layers): their k / v "
            "inputs are another layer's, which the graph does not express yet"
        )
    return "; and ".join(reasons) or None


def _out_width(module: torch.nn.Module | None) -> int | None:
    """A linear map's output width (its weight's rows), or None."""
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, Tensor) else None


def check_bridge(model: HookedModel, input_ids: Tensor | None = None) -> None:
    """Raise `UnsupportedModelError` unless the bridge computes the Hugging Face model it wraps: its logits
    are compared with those of the un-bridged model (same parameters) on a probe batch."""
    ids = (probe_ids(model) if input_ids is None else input_ids).to(model.device)
    with torch.no_grad():
        try:
            ours = model(ids).float()
        except Exception as failure:
            raise UnsupportedModelError(
                f"{model.spec.name}: the TransformerLens bridge fails to run this model "
                f"({type(failure).__name__}: {' '.join(str(failure).split())[:200]}), a fault of its "
                "adapter for this architecture (or of its versions' match with transformers); report it to "
                "TransformerLens"
            ) from failure
        theirs = plain_model(model)(ids).logits.float()
    if model.dtype == torch.float32:
        err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
        agree, measured = err <= 1e-4 * max(scale, 1.0), f"up to {err:.3g} (largest |logit| {scale:.3g})"
    else:
        # The bridge and the plain model round the same function differently, and in half precision the
        # two drift apart with depth (SmolLM2, 30 layers: 1.6 epsilon of bfloat16, 1.7 of float16, as
        # far apart as either is from float32): the relative RMS difference is held to a few epsilon.
        relative = float((ours - theirs).pow(2).mean().sqrt() / theirs.pow(2).mean().sqrt().clamp_min(1e-12))
        eps = torch.finfo(model.dtype).eps
        agree = relative <= HALF_PRECISION_EPS * eps
        measured = f"a relative RMS of {relative:.3g} ({relative / eps:.1f} epsilon of {model.dtype})"
    if not agree:
        raise UnsupportedModelError(
            f"{model.spec.name}: the TransformerLens bridge's logits differ from the Hugging Face model's by "
            f"{measured} on a probe batch, so the bridge adapter for this "
            "architecture does not compute the model and no score read from it would be right. Report it to "
            "TransformerLens; load_model(..., check=False) skips the checks at your own risk"
        )


def check_additivity(model: HookedModel, input_ids: Tensor | None = None) -> None:
    """Raise `AdditivityError` unless the model decomposes as the graph assumes (see module doc)."""
    spec = model.spec
    input_ids = (probe_ids(model) if input_ids is None else input_ids).to(model.device)
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    fired: dict[str, int] = {}

    def save(name: str) -> HookFn:
        def fn(x: Tensor) -> Tensor:
            # A fresh view, so that its gradient is the one of this branch alone (hook points return
            # the very tensor they get, which the residual stream also carries on).
            fired[name] = fired.get(name, 0) + 1
            y = x.view_as(x)
            acts[name] = y.detach()
            if y.requires_grad:
                y.register_hook(lambda g: grads.__setitem__(name, g.detach()))
            return y

        return fn

    sites = wiring(model)  # every hook the graph reads, and the residual stream around each block
    names = [model.final_norm_in_hook]
    for layer in range(spec.n_layers):  # in layer order, so that a refusal names the first hook missing
        sources = [src for src in sites.sources if src.layer == layer]
        destinations = [dst for dst in sites.destinations if dst.layer == layer]
        names += [model.resid_pre_hook(layer), model.resid_post_hook(layer)]
        names += [src.output_hook for src in sources] + [src.hook for src in sources]
        names += [dst.residual_hook for dst in destinations if dst.residual_hook]
        names += [dst.hook for dst in destinations if dst.kind in ("mixer", "mlp")]
        names += [dst.hook for dst in destinations if dst.letter]
        names += [dst.gate_hook for dst in destinations if dst.gate_hook]
        if not spec.has_attention(layer):
            names.append(model.mixer_in_hook(layer))
    names = list(dict.fromkeys(names))  # one hook each

    def make_leaf(x: Tensor) -> Tensor:
        return x.detach().requires_grad_(True)

    hooks = [(model.input_hook, make_leaf)] + [(n, save(n)) for n in names]
    with torch.enable_grad(), model.hooks(hooks):
        logits = model(input_ids)
        logits.float().pow(2).mean().backward()

    twice = [name for name in names if fired.get(name, 0) > 1]
    if twice:
        raise AdditivityError(
            f"{spec.name}: hook points the graph reads run more than once in a forward pass ({twice[0]}: "
            f"{fired[twice[0]]} times; NanoChat's final norm also normalises the embeddings): a patch or a "
            "gradient read there would also land on the other use, so its edges cannot be read"
        )
    unreached = [name for name in names if name not in acts]
    if unreached:
        raise AdditivityError(
            f"{spec.name}: hook points the graph reads were never reached in a forward pass "
            f"({', '.join(unreached[:4])}{', ...' if len(unreached) > 4 else ''}): the bridge does not route "
            "this architecture's computation through them, so its edges cannot be read"
        )
    rtol = 1e-4 if logits.dtype == torch.float32 else 2e-2
    scalars = model.layer_scalars()
    for layer in range(spec.n_layers):
        pre, post = acts[model.resid_pre_hook(layer)], acts[model.resid_post_hook(layer)]
        beside = layer in spec.parallel_mixer_layers  # a mixer beside the heads (Falcon-H1)
        attn = acts[model.attn_out_hook(layer)]
        if not spec.has_attention(layer):  # a mixer's hooked output, as the block adds it
            attn = attn * model.mixer_scale(layer)
        mixer = acts[model.mixer_out_hook(layer)] * model.mixer_scale(layer) if beside else 0.0
        written = attn + mixer  # the token mixers' writes
        mlp = acts[model.mlp_out_hook(layer)] if spec.has_mlp(layer) else torch.zeros_like(attn)
        _close(spec.name, model.attn_norm_in_hook(layer), acts[model.attn_norm_in_hook(layer)], pre, rtol)
        if spec.per_head_sources and spec.has_attention(layer):
            heads = model.head_results(layer, acts[model.head_z_hook(layer)]).sum(2)
            b_o = model.b_O(layer)
            _close(spec.name, model.attn_out_hook(layer), attn, heads if b_o is None else heads + b_o, rtol)
        mlp_in = pre if spec.parallel_attn_mlp else pre + written
        if model.mlp_shares_attn_norm:
            mlp_in = model.attn_norm(layer)(mlp_in)
        mlp_hook = model.mlp_destination_hook(layer)
        if spec.has_mlp(layer):
            _close(spec.name, mlp_hook, acts[mlp_hook], mlp_in, rtol)
        scalar = 1.0 if scalars is None else scalars[layer]  # Gemma-4: the layer rescales the whole stream
        _close(spec.name, model.resid_post_hook(layer), post, scalar * (pre + written + mlp), rtol)
        following = model.resid_pre_hook(layer + 1) if layer + 1 < spec.n_layers else model.final_norm_in_hook
        _close(spec.name, following, acts[following], post, rtol)

        resid = acts[model.attn_norm_in_hook(layer)]
        one = torch.ones(1, device=resid.device)
        if spec.has_attention(layer):
            per_head = [grads[model.head_input_hook(layer, letter)] for letter in QKV_LETTERS]
            gate = model.head_gate_hook(layer)
            if gate is not None:
                per_head[0] = model.join_gate(per_head[0], grads[gate])
            total = model.attn_input_grads(layer, resid, per_head).sum(2)
        else:  # the mixer alone reads the norm: its input's gradient pulled back through it is all of it
            total = model.shared_norm_grads(layer, resid, grads[model.mixer_in_hook(layer)], one)
        if beside:  # the mixer reads the attention norm's output too
            total = total + model.shared_norm_grads(layer, resid, grads[model.mixer_in_hook(layer)], one)
        if model.mlp_shares_attn_norm:
            total = total + model.shared_norm_grads(layer, resid, grads[mlp_hook], one)
        _close(
            spec.name,
            f"{model.attn_norm_in_hook(layer)} (gradient through per-head q/k/v or the mixer, and a sharing "
            "MLP)",
            total,  # type: ignore[arg-type]
            grads[model.attn_norm_in_hook(layer)],
            rtol * 10,
        )


def check_heads_independent(model: HookedModel, input_ids: Tensor | None = None) -> None:
    """Raise `AdditivityError` unless each head's output depends on its own q/k/v input slice only.

    The graph patches head h's q (k, v) input by rewriting head h's slice where the heads' input values
    live (`HookedModel.head_input_hook`: the projection's output, or past a q/k norm over all heads that
    norm's output); that is head h's input alone only if nothing after that point mixes heads. Checked on
    a probe batch: the Jacobian of the other heads' z with respect to head 0's slice must vanish, layer by
    layer. Where heads are mixed before the output projection (`heads_mixed_before_output`), only q and k
    are checked, on the attention pattern.
    """
    spec = model.spec
    ids = (probe_ids(model) if input_ids is None else input_ids).to(model.device)
    leaves: dict[tuple[int, str], Tensor] = {}

    def as_leaf(key: tuple[int, str]) -> HookFn:
        def fn(x: Tensor) -> Tensor:
            leaves[key] = x.detach().requires_grad_(True)  # cut: only this layer's use of it is seen
            return leaves[key]

        return fn

    # where a head's own output is read: z, or where heads are mixed before the output projection
    # (BitNet), the attention pattern (which q and k alone reach; v then reaches only mixed outputs)
    mixed = probed(model, heads_mixed_before_output.__name__, heads_mixed_before_output)
    letters: tuple[QKV, ...] = ("q", "k") if mixed else QKV_LETTERS
    outputs = model.attn_pattern_hook if mixed else model.head_z_hook

    def keep(layer: int) -> HookFn:
        def fn(x: Tensor) -> None:  # [b, P, n_heads * d_head] or a pattern [b, n_heads, P, P]
            heads = x.transpose(1, 2) if mixed else x.reshape(*x.shape[:2], spec.n_heads, spec.d_head)
            out[layer] = heads

        return fn

    def read_at(layer: int) -> list[tuple[str, str, int, int]]:
        """(name, hook, width per head, heads reading slice 0) of each per-head input value of the layer:
        its q, k, v and the heads' own output gates where a projection of their own computes them."""
        group = spec.n_heads // spec.n_kv_heads
        values = [
            (letter, model.head_input_hook(layer, letter), model.qkv_width(layer, letter), group)
            for letter in letters
        ]
        gate = model.head_gate_hook(layer)
        values[0] = (*values[0][:3], 1)  # a q slice is one head's
        return values + ([] if gate is None or mixed else [("gate", gate, model.gate_width(layer), 1)])

    out: dict[int, Tensor] = {}
    hooks: list[tuple[str, HookFn]] = []
    for layer in spec.attention_layers:
        hooks += [(hook, as_leaf((layer, name))) for name, hook, _, _ in read_at(layer)]
        hooks.append((outputs(layer), keep(layer)))
    gen = torch.Generator().manual_seed(1)
    with torch.enable_grad(), model.hooks(hooks):
        model(ids)
        for layer in spec.attention_layers:
            probe = torch.randn(out[layer].shape, generator=gen).to(out[layer]) * out[layer]
            for name, hook, width, readers in read_at(layer):
                own, others = probe[:, :, :readers].sum(), probe[:, :, readers:].sum()
                leak, scale = (_slice_grad(loss, leaves[layer, name], width) for loss in (others, own))
                if leak > 1e-5 * max(scale, 1e-6):
                    raise AdditivityError(
                        f"{spec.name}: in layer {layer}, head 0's {name} input (at {hook}) also moves other "
                        f"heads' outputs (gradient {leak:.3g} vs {scale:.3g} for its own): something after "
                        f"that point mixes heads, so the graph's per-head {name} inputs are not where this "
                        "architecture's heads read their own"
                    )


def heads_mixed_before_output(model: HookedModel, input_ids: Tensor | None = None) -> bool:
    """Whether something between attention and the output projection mixes heads (BitNet's norm over
    the concatenated head outputs, `attn_sub_norm`): in some layer, another head's value of z (the output
    projection's input) moves with head 0's v input. Then a head's z W_O[h] is no output of that head
    alone, and the layer's attention output is one source (as for post-norm blocks)."""
    spec = model.spec
    layers = spec.attention_layers
    reads = [model.head_input_hook(layer, "v") for layer in layers] + [
        model.head_z_hook(layer) for layer in layers
    ]
    if spec.n_heads == 1 or not all(model.has_hook(name) for name in reads):
        return False  # nothing to mix, or no heads where the checks look for them (they refuse the model)
    ids = (probe_ids(model) if input_ids is None else input_ids).to(model.device)
    leaves: dict[int, Tensor] = {}
    z: dict[int, Tensor] = {}

    def as_leaf(layer: int) -> HookFn:
        def fn(x: Tensor) -> Tensor:
            leaves[layer] = x.detach().requires_grad_(True)
            return leaves[layer]

        return fn

    def keep_z(layer: int) -> HookFn:
        return lambda x: z.__setitem__(layer, x)

    hooks: list[tuple[str, HookFn]] = []
    for layer in layers:
        hooks.append((model.head_input_hook(layer, "v"), as_leaf(layer)))
        hooks.append((model.head_z_hook(layer), keep_z(layer)))
    with torch.enable_grad(), model.hooks(hooks):
        model(ids)
        readers = spec.n_heads // spec.n_kv_heads  # the heads reading value head 0
        for layer in layers:
            heads = z[layer].reshape(*z[layer].shape[:2], spec.n_heads, spec.d_head)
            width = model.qkv_width(layer, "v")
            leak = _slice_grad(heads[:, :, readers:].pow(2).sum(), leaves[layer], width)
            own = _slice_grad(heads[:, :, :readers].pow(2).sum(), leaves[layer], width)
            if leak > 1e-5 * max(own, 1e-6):
                return True
    return False


def _slice_grad(loss: Tensor, x: Tensor, width: int) -> float:
    """max |d loss / d x[..., :width]| (0 where loss does not depend on x)."""
    (grad,) = torch.autograd.grad(loss, x, retain_graph=True, allow_unused=True)
    return 0.0 if grad is None else grad[..., :width].abs().max().item()


_PROBED: weakref.WeakKeyDictionary[HookedModel, dict[str, Any]] = weakref.WeakKeyDictionary()


def probed(model: HookedModel, key: str, probe: Callable[[HookedModel], Any]) -> Any:
    """`probe(model)`, run once per model and remembered (probes cost a few forward passes)."""
    found = _PROBED.setdefault(model, {})
    if key not in found:
        found[key] = probe(model)
    return found[key]


def pattern_problem(model: HookedModel) -> str | None:
    """Why the attention pattern hooks do not feed the heads' outputs (replacing the pattern must change
    them), or None."""
    names = [model.attn_pattern_hook(layer) for layer in model.spec.attention_layers]
    if not all(model.has_hook(name) for name in names):
        return "the bridge has no attention pattern hook"
    ids = probe_ids(model).to(model.device)
    heads = [model.head_z_hook(layer) for layer in model.spec.attention_layers]
    with torch.no_grad(), model.capture(heads, clone=True) as clean:
        model(ids)
    flat = [(n, lambda p: torch.full_like(p, 1.0 / p.shape[-1])) for n in names]
    with torch.no_grad(), model.hooks(flat), model.capture(heads, clone=True) as flattened:
        model(ids)
    for head in heads:
        if torch.allclose(clean[head], flattened[head]):
            return (
                f"the attention pattern hook does not feed {head} (the bridge computes attention elsewhere)"
            )
    return None
