"""The ungrouped twin of a grouped-query model: every query head with a key and value projection of its
own (the weights of its key-value head, repeated), which is how EAP-IG (`ungroup_grouped_query_attention`)
and MIB define the graph of such a model.

The twin computes the same function (checked on a probe when it is made). Its graph gives query head h its
own k and v inputs, so every method scores them, and exact patching patches them, as it does any head's
input: the gradient at head h's copy is the part of the shared k / v gradient that flows through head h's
attention, and the grouped score of a gradient method is the sum of its copies' scores.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from circuits.errors import UnsupportedModelError
from circuits.models.hooked import HookedModel, ModelSpec


def ungrouped_spec(spec: ModelSpec) -> ModelSpec:
    """`spec` with one key-value head per query head."""
    return replace(spec, n_kv_heads=spec.n_heads)


def model_for(model: HookedModel, spec: ModelSpec) -> HookedModel:
    """The model a graph of `spec` runs on: `model`, or its ungrouped twin when `spec` is `model`'s spec
    ungrouped (a graph from `Graph.from_model(model, ungrouped=True)` or an EAP-IG / MIB file)."""
    own = model.spec
    if own.n_kv_heads != own.n_heads and spec.n_kv_heads == own.n_heads and spec.n_heads == own.n_heads:
        return ungrouped_model(model)
    return model


def ungrouped_model(model: HookedModel) -> HookedModel:
    """The ungrouped twin of `model` (`model` itself without grouped-query attention), made once and kept.

    Raises `UnsupportedModelError` when the attention has no separate key and value projections to repeat
    (a fused qkv projection) or when the twin does not compute the model's logits.
    """
    from circuits.models.loading import load_model, private_copy

    spec = model.spec
    if spec.n_kv_heads == spec.n_heads:
        return model
    if model.ungrouped is not None:
        return model.ungrouped
    if model.source is None:
        raise UnsupportedModelError(
            f"{spec.name}: this model keeps no copy of the Hugging Face model it was loaded from, so no "
            "ungrouped twin can be made; load it with circuits.load_model"
        )
    twin = private_copy(model.source)
    _expand_key_values(twin, spec)
    device_map = getattr(model.source, "hf_device_map", None)
    ungrouped = load_model(
        twin,
        model.tokenizer,
        prepend_bos=model.prepend_bos,
        device=None if device_map else model.device,
        dtype=model.dtype,
        device_map=dict(device_map) if device_map else None,
    )
    ungrouped.spec = replace(ungrouped.spec, name=spec.name)
    _check_same_function(model, ungrouped)
    model.ungrouped = ungrouped
    return ungrouped


def _expand_key_values(hf_model: nn.Module, spec: ModelSpec) -> None:
    """Repeat each key-value head's k and v projection rows (and biases) for the query heads it serves,
    in place, and tell the attention modules and the config that every head has its own."""
    groups, rows = spec.n_heads // spec.n_kv_heads, spec.n_kv_heads * spec.d_head
    found = 0
    for module in hf_model.modules():
        projections = [getattr(module, name, None) for name in ("k_proj", "v_proj")]
        if not all(isinstance(p, nn.Linear) and p.out_features == rows for p in projections):
            continue
        for name, projection in zip(("k_proj", "v_proj"), projections):
            setattr(module, name, _repeated(projection, spec.n_kv_heads, groups))  # type: ignore[arg-type]
        k_norm = getattr(module, "k_norm", None)
        weight = getattr(k_norm, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.numel() == rows and spec.n_kv_heads > 1:
            # a k norm over all key heads (OLMo-2): repeating every head's keys leaves their mean and mean
            # square unchanged (with one key head it cannot be told from a per-head norm; the check below
            # refuses the twin if it was one)
            repeated = weight.detach().view(spec.n_kv_heads, -1).repeat_interleave(groups, 0).reshape(-1)
            k_norm.weight = nn.Parameter(repeated, requires_grad=False)  # type: ignore[union-attr]
            for attribute in ("normalized_shape", "hidden_size"):
                if isinstance(getattr(k_norm, attribute, None), tuple):
                    setattr(k_norm, attribute, (repeated.numel(),))
        for attribute in ("num_key_value_groups",):
            if hasattr(module, attribute):
                setattr(module, attribute, 1)
        for attribute in ("num_key_value_heads", "num_kv_heads"):
            if hasattr(module, attribute):
                setattr(module, attribute, spec.n_heads)
        found += 1
    if found != len(spec.attention_layers):
        raise UnsupportedModelError(
            f"{spec.name}: {found} of its {len(spec.attention_layers)} attention layers have separate "
            f"k_proj / v_proj projections of {spec.n_kv_heads} key-value heads; the ungrouped graph repeats "
            "those (a fused qkv projection is not split here)"
        )
    config = getattr(hf_model, "config", None)
    for key in ("num_key_value_heads", "n_kv_heads", "num_kv_heads"):
        if config is not None and getattr(config, key, None) is not None:
            setattr(config, key, spec.n_heads)


def _repeated(projection: nn.Linear, n_kv: int, groups: int) -> nn.Linear:
    """`projection` with each of its `n_kv` row blocks repeated `groups` times in place (query head h
    reads key-value head h // groups, as Hugging Face's `repeat_kv` pairs them)."""
    weight = projection.weight.detach()
    d_in = weight.shape[1]
    out = nn.Linear(
        d_in,
        weight.shape[0] * groups,
        bias=projection.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        out.weight.copy_(weight.view(n_kv, -1, d_in).repeat_interleave(groups, 0).reshape(-1, d_in))
        if projection.bias is not None:
            bias = projection.bias.detach()
            out.bias.copy_(bias.view(n_kv, -1).repeat_interleave(groups, 0).reshape(-1))
    out.requires_grad_(False)
    return out


def _check_same_function(model: HookedModel, twin: HookedModel) -> None:
    """`UnsupportedModelError` unless the twin's logits are the model's on a probe prompt."""
    ids = (torch.arange(2, 14) % model.d_vocab)[None].to(model.device)
    with torch.no_grad():
        expected, got = model(ids).float(), twin(ids).float()
    scale = float(expected.abs().max()) or 1.0
    error = float((got.to(expected.device) - expected).abs().max()) / scale
    tolerance = 1e-4 if model.dtype == torch.float32 else 2e-2
    if error > tolerance:
        raise UnsupportedModelError(
            f"{model.spec.name}: its ungrouped twin (k / v projections repeated per query head) does not "
            f"compute the model's logits (relative error {error:.2e} > {tolerance:g}); this attention "
            "layout is not ungrouped here"
        )
