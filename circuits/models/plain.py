"""The model without the bridge: a plain Hugging Face module sharing the bridge's parameter tensors.

TransformerLens' bridge components do not fill Hugging Face key/value caches, and neuron attribution wants
them (one-position passes over a cached prefix). This rebuilds the original architecture from its config,
skips weight initialisation, and assigns the bridge model's own tensors (no copy), so the two always agree.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from circuits.errors import UnsupportedModelError
from circuits.models.hooked import HookedModel

_WRAPPER = "._original_component"
_DOWN_PROJECTION = re.compile(r"\.(\d+)\.mlp\.(down_proj|c_proj|fc2|dense_4h_to_h)$")


def plain_model(model: HookedModel, attention: str | None = None) -> PreTrainedModel:
    """The un-bridged Hugging Face model (built once per HookedModel and attention, parameters shared;
    built again when the bridge's parameters were replaced, as `model.bridge.to(device)` does).

    `attention` names a registered Hugging Face attention implementation (default: the bridge model's).
    """
    bridged = model.bridge.original_model
    key = tuple(id(p) for p in bridged.parameters())
    built = model._plain_models.get(attention)
    if built is not None and built[0] == key:
        return built[1]  # type: ignore[return-value]
    config = copy.deepcopy(bridged.config)
    if attention is not None:
        config._attn_implementation = attention
    with no_init_weights():
        plain = type(bridged)(config)
    adapter = model.bridge.adapter
    if getattr(adapter, "restructures_modules", False):  # as the bridged model was (`models.adapters`)
        adapter.prepare_model(plain)
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
    _move_inputs_as_placed(plain, getattr(bridged, "hf_device_map", None) or {})
    model._plain_models[attention] = (key, plain)
    return plain


def _move_inputs_as_placed(plain: nn.Module, device_map: dict[str, str | int]) -> None:
    """For a model over several devices, move each placed module's tensor inputs to its device, as
    accelerate's hooks do in the bridged model (the rebuilt modules have none); entries that are no
    device (accelerate's "disk") are left alone."""
    devices = {name: _as_device(place) for name, place in device_map.items()}
    if len({d for d in devices.values() if d is not None}) < 2:
        return
    for name, device in devices.items():
        if device is not None:
            plain.get_submodule(name).register_forward_pre_hook(_inputs_to(device), with_kwargs=True)


def _as_device(place: str | int) -> torch.device | None:
    try:
        return torch.device(place)
    except (RuntimeError, TypeError):
        return None


def _inputs_to(device: torch.device) -> Callable[..., tuple[Any, Any]]:
    def hook(_module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
        def move(a: Any) -> Any:
            return a.to(device) if isinstance(a, torch.Tensor) else a

        return tree_map(move, args), tree_map(move, kwargs)

    return hook


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
