"""The model without the bridge: a plain Hugging Face module sharing the bridge's parameter tensors.

TransformerLens' bridge components do not fill Hugging Face key/value caches, and neuron attribution wants
them (one-position passes over a cached prefix). This rebuilds the original architecture from its config,
skips weight initialisation, and assigns the bridge model's own tensors (no copy), so the two always agree.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from circuits.errors import UnsupportedModelError
from circuits.models.hooked import HookedModel

_WRAPPER = "._original_component"
_DOWN_PROJECTION = re.compile(r"\.(\d+)\.mlp\.(down_proj|c_proj|fc2|dense_4h_to_h)$")


def plain_model(model: HookedModel, attention: str | None = None) -> PreTrainedModel:
    """The un-bridged Hugging Face model (built once per HookedModel and attention, parameters shared).

    `attention` names a registered Hugging Face attention implementation (default: the bridge model's).
    """
    built = model._plain_models
    if attention in built:
        return built[attention]  # type: ignore[return-value]
    bridged = model.bridge.original_model
    config = copy.deepcopy(bridged.config)
    if attention is not None:
        config._attn_implementation = attention
    with no_init_weights():
        plain = type(bridged)(config)
    state = {k.replace(_WRAPPER, ""): v for k, v in bridged.state_dict(keep_vars=True).items()}
    wanted = plain.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise UnsupportedModelError(
            f"{model.spec.name}: cannot rebuild the Hugging Face model from the bridge's parameters "
            f"(missing {missing[:5]}), so the bridge cannot be checked against it"
        )
    plain.load_state_dict({k: state[k] for k in wanted}, assign=True)
    plain.eval().requires_grad_(False)
    built[attention] = plain
    return plain


def down_projections(plain: nn.Module) -> list[nn.Module]:
    """Each layer's MLP output projection, in layer order; its input is the layer's neuron activations."""
    found: dict[int, nn.Module] = {}
    for name, module in plain.named_modules():
        match = _DOWN_PROJECTION.search(name)
        if match:
            found[int(match.group(1))] = module
    if not found:
        raise RuntimeError(f"no MLP output projections found in {type(plain).__name__}")
    return [found[i] for i in sorted(found)]


def plain_submodule(model: HookedModel, component: str, attention: str | None = None) -> Any:
    """The plain model's module behind a bridge component (`blocks`, `ln_final`, `unembed`, ...)."""
    name = model.bridge.adapter.component_mapping[component].name
    return plain_model(model, attention).get_submodule(name)
