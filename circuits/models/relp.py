"""Relevance Patching's backward rules (RelP, Jafari et al. 2025, arXiv 2508.21258, which takes them from
AttnLRP, Achtibat et al. ICML 2024) as forward hooks that keep every value and change only the backward.

Each rule swaps a tensor y for y.detach() + (s - s.detach()): the forward value is untouched, the gradient
is the surrogate s's:
- LN rule: a norm's output through s = gain * centre(x) * r(x).detach() (the normalising scale a constant);
- identity rule: an MLP's activation h = act(z) passes the gradient with slope h / z (stabilised near 0);
- half rule: a gated MLP's h = act(z) * u sends half of the product's gradient into each factor;
- CP rule (optional): the attention pattern is a constant (relevance reaches the residual through v only).
Every other operation (linear maps, residual sums, softmax without CP, RoPE) keeps its gradient.

Where each rule goes is found from what the model computes, not from class names: norms are the bridge's
normalisation components whose function `norm_form` verifies; an MLP's activation input z, up projection u
and output-projection input h are checked on a probe batch (h must follow z feature by feature, and for a
gated MLP scale with u); the pattern hook must feed the heads' outputs. A rule that cannot be placed is
refused with `UnsupportedModelError` naming the place; turn that rule off to go on without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.errors import UnsupportedModelError
from circuits.models.checks import pattern_problem, probe_ids, probed
from circuits.models.hooked import QKV_LETTERS, HookedModel, HookFn
from circuits.models.norms import NormForm, norm_form, with_frozen_scale

_STABILISER = 1e-6  # |denominator| below which the identity rule's ratio is taken against +-1e-6


@dataclass(frozen=True)
class RelPRules:
    """Which of RelP's backward rules to apply (defaults: the paper's)."""

    ln: bool = True  # norms' scales constant
    identity: bool = True  # element-wise activations pass relevance unchanged (slope act(z) / z)
    half: bool = True  # a gated MLP's product gives half the gradient to each factor
    cp: bool = False  # attention patterns constant


RELP_RULES = ("ln", "identity", "half", "cp")  # the fields of RelPRules, by name (the CLI's choices)


@dataclass(frozen=True)
class _Mlp:
    z: str  # hook carrying the activation's input
    u: str | None  # hook carrying the up projection's output (gated MLPs)
    h: str  # hook carrying the output projection's input (act(z), or act(z) * u)


class RelPBackward:
    """The rules of `rules` placed in `model`; `hooks()` gives a fresh set for each forward pass.

    Add them after any other hook on the same hook points: the LN rule reads a norm's input as the last
    hook left it, so that gradients other hooks observe there stay on the path.
    """

    def __init__(self, model: HookedModel, rules: RelPRules) -> None:
        self.model, self.rules = model, rules
        self.forms: dict[tuple[str, str], NormForm] = {}
        if rules.ln:
            for in_hook, out_hook in model.norm_hooks():
                prefix = model.norm_component(in_hook)
                module = _norm_module(model, prefix)
                if isinstance(module, torch.nn.Identity):
                    continue  # a slot without a norm
                form = _norm_form(model, module)
                if form is None:
                    raise UnsupportedModelError(
                        f"{model.spec.name}: RelP's LN rule cannot be placed at {prefix}: its function is "
                        "neither a LayerNorm nor an RMSNorm with a known eps (pass RelPRules(ln=False) to "
                        "keep that norm's gradient)"
                    )
                self.forms[in_hook, out_hook] = form
        self.mlps: tuple[_Mlp, ...] = ()
        if rules.identity or rules.half:
            mlps = probed(model, "mlps", _find_mlps)
            if isinstance(mlps, str):
                raise UnsupportedModelError(
                    f"{model.spec.name}: RelP's identity / half rules cannot be placed: {mlps} (pass "
                    "RelPRules(identity=False, half=False) to keep the MLPs' gradients)"
                )
            self.mlps = mlps  # type: ignore[assignment]
        self.patterns: tuple[str, ...] = ()
        if rules.cp:
            problem = probed(model, "pattern", pattern_problem)
            if problem:
                raise UnsupportedModelError(f"{model.spec.name}: RelP's CP rule cannot be placed: {problem}")
            self.patterns = tuple(model.attn_pattern_hook(layer) for layer in range(model.spec.n_layers))

    def around(self, hooks: Sequence[tuple[str, HookFn]]) -> list[tuple[str, HookFn]]:
        """`hooks` with a fresh set of the rules around them: after them, except where a norm's output is
        where the heads' q/k inputs are read (a q/k norm over all heads): there the rule goes first, so
        that the gradient read at that point has passed the rule and the backward pass goes on through it
        (the destinations' pull-back freezes that norm's scale itself: `HookedModel.attn_input_grads`)."""
        model = self.model
        head_inputs = {
            model.head_input_hook(layer, letter)
            for layer in range(model.spec.n_layers)
            for letter in QKV_LETTERS
        }
        first: list[tuple[str, HookFn]] = []
        last: list[tuple[str, HookFn]] = []
        for (in_hook, out_hook), form in self.forms.items():
            keep, frozen = _ln_rule(in_hook, out_hook, form)
            last.append(keep)
            (first if out_hook in head_inputs else last).append(frozen)
        for mlp in self.mlps:
            last += _mlp_rule(mlp, self.rules.identity, self.rules.half)
        last += [(name, _constant) for name in self.patterns]
        return [*first, *hooks, *last]


# ------------------------------------------------------------------------------------------- rules
def _through(y: Tensor, s: Tensor) -> Tensor:
    """y's value with s's gradient."""
    return y.detach() + (s - s.detach()).to(y.dtype)


def _constant(x: Tensor) -> Tensor:
    return x.detach()


def _ln_rule(in_hook: str, out_hook: str, form: NormForm) -> tuple[tuple[str, HookFn], tuple[str, HookFn]]:
    seen: list[Tensor] = []

    def keep(x: Tensor) -> None:
        seen.append(x)

    def frozen_scale(y: Tensor) -> Tensor | None:
        x = seen.pop()
        return with_frozen_scale(form, x, y) if x.requires_grad else None

    return (in_hook, keep), (out_hook, frozen_scale)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, with den kept at least 1e-6 away from zero (its sign kept, 0 counted as +)."""
    sign = torch.where(den >= 0, 1.0, -1.0)
    return num / torch.where(den.abs() >= _STABILISER, den, _STABILISER * sign)


def _mlp_rule(mlp: _Mlp, identity: bool, half: bool) -> list[tuple[str, HookFn]]:
    seen: dict[str, Tensor] = {}

    def keep(key: str) -> HookFn:
        return lambda x: seen.__setitem__(key, x)

    def rule(h: Tensor) -> Tensor | None:
        z, u = seen.pop("z"), seen.pop("u", None)
        if not h.requires_grad:
            return None
        if not identity:  # half rule alone: the product's own gradient, halved
            return 0.5 * h + 0.5 * h.detach() if u is not None else None
        hf = h.detach().float()
        s = z.float() * _ratio(hf, z.detach().float())  # d h / d z = h / z
        if u is not None:  # act(z) * u: d h / d u = act(z) = h / u
            s = s + u.float() * _ratio(hf, u.detach().float())
            if half:
                s = 0.5 * s
        return _through(h, s)

    hooks = [(mlp.z, keep("z")), (mlp.h, rule)]
    if mlp.u is not None:
        hooks.insert(1, (mlp.u, keep("u")))
    return hooks


# ------------------------------------------------------------------------------------- placement
def _norm_module(model: HookedModel, prefix: str) -> torch.nn.Module:
    component = model.bridge.get_submodule(prefix)
    original = getattr(component, "original_component", None)
    return original if isinstance(original, torch.nn.Module) else component


def _norm_form(model: HookedModel, module: torch.nn.Module) -> NormForm | None:
    weight = getattr(module, "weight", None)
    d = weight.shape[-1] if isinstance(weight, Tensor) and weight.dim() == 1 else model.spec.d_model
    return norm_form(module, d)


def _find_mlps(model: HookedModel) -> tuple[_Mlp, ...] | str:
    mlps = []
    for layer in range(model.spec.n_layers):
        if not model.spec.has_mlp(layer):
            continue  # a Mamba block: nothing to place
        mlp = _Mlp(*model.mlp_activation_hooks(layer))
        missing = [n for n in (mlp.z, mlp.u, mlp.h) if n is not None and not model.has_hook(n)]
        if missing:
            return (
                f"layer {layer}'s MLP has no hook point {missing[0]} (a mixture of experts, or an MLP "
                "the bridge does not split)"
            )
        mlps.append(mlp)
    problem = _check_mlps(model, mlps) if mlps else None
    return problem if problem else tuple(mlps)


def _check_mlps(model: HookedModel, mlps: list[_Mlp]) -> str | None:
    """Why h is not act(z) (times u) feature by feature at some layer, or None.

    Pass 1 records z, u, h; pass 2 permutes z's features (and u's, doubled) and puts the recorded h back
    after reading the new one, so that every layer sees its recorded input: h must come out permuted (and
    doubled)."""
    ids = probe_ids(model).to(model.device)
    names = [n for mlp in mlps for n in (mlp.z, mlp.u, mlp.h) if n is not None]
    try:
        with torch.no_grad(), model.capture(names, clone=True) as record:
            model(ids)
    except Exception as failure:  # a hook point the bridge does not run
        return f"the MLP hook points fail ({type(failure).__name__}: {failure})"
    if set(record) != set(names):
        return f"the bridge never runs {sorted(set(names) - set(record))[0]}"
    d = record[mlps[0].h].shape[-1]
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(0)).to(model.device)
    after: dict[str, Tensor] = {}
    hooks: list[tuple[str, HookFn]] = []
    for mlp in mlps:
        if record[mlp.z].shape != record[mlp.h].shape or (
            mlp.u is not None and record[mlp.u].shape != record[mlp.h].shape
        ):
            return f"{mlp.h} does not have the shape of {mlp.z}"
        hooks.append((mlp.z, lambda x: x[..., perm]))
        if mlp.u is not None:
            hooks.append((mlp.u, lambda x: 2 * x[..., perm]))

        def swap(x: Tensor, name: str = mlp.h) -> Tensor:
            after[name] = x.detach().clone()
            return record[name]

        hooks.append((mlp.h, swap))
    with torch.no_grad(), model.hooks(hooks):
        model(ids)
    for mlp in mlps:
        want = record[mlp.h][..., perm] * (2 if mlp.u is not None else 1)
        scale = float(want.abs().max()) + 1e-12
        if float((after[mlp.h] - want).abs().max()) > 1e-4 * scale:
            kind = "act(z) * u" if mlp.u is not None else "act(z)"
            return f"{mlp.h} is not {kind} feature by feature of {mlp.z}"
    return None
