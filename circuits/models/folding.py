"""Block multipliers folded into the linear maps next to them, so that hook points carry what the graph
adds and reads.

Falcon-H1 (maximal-update parametrisation) scales inside each decoder layer: attention reads the normed
residual times `attention_in_multiplier`, and the layer adds `attn_out_multiplier` times the attention
output and `ssm_out_multiplier` times its Mamba mixer's output to the residual stream. TransformerLens'
hook points sit before these products (`hook_attn_out`, `mamba.hook_out`), so a source's hooked output is
not what it adds and a head's hooked q input is not a function of the normed residual through its
projection alone. Each multiplier is a scalar next to a linear map, so it moves into that map's weight
(and bias, on the output side) without changing the function: W (m x) = (m W) x and m (W x + b) =
(m W) x + m b. The folded maps are new parameters on the toolkit's private copy of the model; the
caller's model and its weights are untouched, and `fold_multipliers` checks the logits stay the same.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from circuits.errors import UnsupportedModelError

# (multiplier attribute of the decoder layer, its config field, the linear maps it folds into, side)
_FOLDS = (
    (
        "attention_in_multiplier",
        "attention_in_multiplier",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "in",
    ),
    ("attn_out_multiplier", "attention_out_multiplier", ("self_attn.o_proj",), "out"),
    ("ssm_out_multiplier", "ssm_out_multiplier", ("mamba.out_proj",), "out"),
)


def fold_multipliers(model: PreTrainedModel) -> bool:
    """Fold every decoder layer's scalar multipliers (`_FOLDS`) into its linear maps, in place on `model`
    (new `Parameter` objects; the old tensors are not written; the config's multipliers set to 1, as a
    model rebuilt from it must compute the same). Returns whether anything was folded; raises
    `UnsupportedModelError` if the logits on a probe batch moved by more than rounding."""
    layers = [m for m in model.modules() if any(isinstance(getattr(m, f[0], None), float) for f in _FOLDS)]
    todo = [(layer, *fold) for layer in layers for fold in _FOLDS if getattr(layer, fold[0], 1.0) != 1.0]
    if not todo:
        return False
    probe = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(model.parameters()).device)
    with torch.no_grad():
        before = model(probe).logits.float()
        for layer, attribute, field, paths, side in todo:
            factor = float(getattr(layer, attribute))
            for path in paths:
                _scale(layer.get_submodule(path), factor, with_bias=side == "out")
            setattr(layer, attribute, 1.0)
            setattr(model.config, field, 1.0)
        after = model(probe).logits.float()
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    if (after - before).abs().max() > tolerance * before.abs().max():
        raise UnsupportedModelError(
            f"{type(model).__name__}: folding the layers' multipliers into their linear maps changed the "
            f"logits by {float((after - before).abs().max()):.3g}: the multipliers are not where this "
            "toolkit expects them"
        )
    return True


def _scale(linear: nn.Module, factor: float, with_bias: bool) -> None:
    """linear's weight (and with `with_bias` its bias) times `factor`, as new parameters."""
    for name in ("weight", "bias") if with_bias else ("weight",):
        old = getattr(linear, name, None)
        if isinstance(old, torch.Tensor):
            setattr(linear, name, nn.Parameter(old.detach() * factor, requires_grad=old.requires_grad))
