"""`load_model`: any Hugging Face causal LM (by name, or built by the caller) as a checked `HookedModel`."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from circuits.distributed import check_available, local_world_size, process_device
from circuits.errors import CircuitsError, InputError, ModelLoadError, UnsupportedModelError
from circuits.models.checks import (
    check_additivity,
    check_bridge,
    check_heads_independent,
    heads_mixed_before_output,
    probed,
    unhandled_features,
)
from circuits.models.embedded import EMBEDDED_NAME, load_embedded, load_gguf
from circuits.models.folding import fold_multipliers
from circuits.models.hooked import HookedModel, ModelSpec, mixer_component
from circuits.models.latent import is_latent

logger = logging.getLogger(__name__)
DEVICE_MAP_PLANS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named placements


def load_model(
    name_or_model: str | PreTrainedModel = EMBEDDED_NAME,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    prepend_bos: bool | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, str | int] | None = None,
    check: bool = True,
) -> HookedModel:
    """Load a causal LM as a `HookedModel` (a TransformerLens `TransformerBridge` with graph facts).

    Args:
        name_or_model: `"smollm2-135m"` (the embedded SmolLM2-135M-Instruct, offline), a hub name or local
            folder (`"gpt2"`, `"Qwen/Qwen2.5-0.5B"`), the path of a GGUF file (`"~/gemma-3-270m.gguf"`:
            dequantised to fp32 once, then cached), or a `PreTrainedModel` you built (with `tokenizer`).
        tokenizer: required with a model object; optional with a name.
        prepend_bos: put the BOS token in front of every prompt. Default: True for GPT-2-style models
            (as TransformerLens and EAP-IG do), else whatever the tokenizer does on its own.
        device, dtype: where (default the CPU) and in which precision the model runs. Under torchrun,
            "cuda" is each process's own GPU (cuda:LOCAL_RANK; `circuits.distributed.process_device`).
        device_map: instead of `device`, layers placed over several devices, as Hugging Face / accelerate
            take it (`"auto"`, `"balanced"`, or a dict from module names to devices); activations move
            between devices at the layer boundaries (accelerate's hooks), the engine's buffers and scores
            stay on the device of the embeddings.
        check: verify that the bridge computes the wrapped model (same logits) and that the model is the
            sum of its graph's parts (`circuits.models.checks`); refuse with `UnsupportedModelError` if not.
    """
    _check_placement(device, device_map)
    if device is not None:
        check_available(device)  # before any work: "gpu", or cuda on a machine without it
    hf_model, tokenizer = _resolve(name_or_model, tokenizer, dtype, device_map)
    if device_map is None:
        hf_model = hf_model.to(device=process_device(device or "cpu"), dtype=dtype)  # type: ignore[call-arg]
    elif getattr(hf_model, "hf_device_map", None) is None:  # a model object, or the embedded model
        hf_model = _dispatched(hf_model.to(dtype=dtype), device_map)  # type: ignore[call-arg]
    hf_model = hf_model.eval()
    hf_model.requires_grad_(False)
    model_name = name_or_model if isinstance(name_or_model, str) else hf_model.config._name_or_path
    model_name = model_name or type(hf_model).__name__
    fold_multipliers(hf_model)  # Falcon-H1's layer multipliers, so that hooks carry what is added and read
    source = private_copy(hf_model)  # unwrapped, over the same weights: what an ungrouped twin is made of
    bridge = _boot(model_name, hf_model, tokenizer, dtype)
    bridge.eval()
    bridge.requires_grad_(False)
    if prepend_bos is None:
        prepend_bos = _default_prepend_bos(hf_model, tokenizer)
    model = HookedModel(bridge, tokenizer, _spec_from_bridge(bridge, model_name), prepend_bos)
    model.source = source
    if check:
        _run_checks(model)
    else:
        _probe_layout(model, check=False)
    return model


def _probe_layout(model: HookedModel, check: bool = True) -> None:
    """Block-layout questions asked on a probe batch, which set the graph's shape: heads mixed before the
    output projection (BitNet) make one attention source per layer. Where a probe cannot run, a refusal
    (as for the checks), or with `check=False` (everything at the caller's risk) the layout as it is."""
    probe = heads_mixed_before_output
    try:
        mixed = model.spec.per_head_sources and probed(model, probe.__name__, probe)
    except CircuitsError:
        if check:
            raise
        return
    except Exception as err:
        if check:
            raise _cannot_run(model, "the load-time probe of its block layout", err) from err
        return
    if mixed:
        model.spec = replace(model.spec, per_head_sources=False)


def _run_checks(model: HookedModel) -> None:
    """`unhandled_features`, `check_bridge`, the layout probe, `check_additivity`, then
    `check_heads_independent`; a failure inside them (an architecture whose tensors do not have the shapes
    the checks expect) is a refusal with its cause, not an internal traceback."""
    unhandled = unhandled_features(model)
    if unhandled:
        raise UnsupportedModelError(f"{model.spec.name}: {unhandled}")
    for check in (check_bridge, _probe_layout, check_additivity, check_heads_independent):
        try:
            check(model)
        except CircuitsError:
            raise
        except Exception as err:
            raise _cannot_run(model, "the load-time checks", err) from err


def _cannot_run(model: HookedModel, what: str, err: Exception) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{model.spec.name}: {what} cannot run on this architecture "
        f"({type(err).__name__}: {' '.join(str(err).split())[:200]}): its blocks do not have the "
        "layout the edge graph needs (attention heads and an MLP reading and writing one residual stream)"
    )


def _check_device_map(hf_model: PreTrainedModel, device_map: dict[str, str | int]) -> None:
    """`InputError` unless every key of `device_map` names a module of the model ("" for all of it) and
    every parameter and buffer falls under one of them, with the names that do not."""
    modules = dict(hf_model.named_modules())
    unknown = [key for key in device_map if key not in modules]
    if unknown:
        near = sorted(name for name in modules if name.count(".") <= 2)[:8]
        named = ", ".join(map(repr, unknown[:5]))
        raise InputError(
            f"device_map names {len(unknown)} module(s) the model does not have ({named}); its modules are "
            f"named like {', '.join(near)}"
        )

    def placed(name: str) -> bool:
        return any(key == "" or name == key or name.startswith(key + ".") for key in device_map)

    tensors = [n for n, _ in hf_model.named_parameters()] + [n for n, _ in hf_model.named_buffers()]
    missing = sorted({n.rsplit(".", 1)[0] for n in tensors if not placed(n)})
    if missing:
        raise InputError(
            f"device_map places no device for {len(missing)} module(s) with weights, e.g. "
            f"{', '.join(missing[:5])}: give each a device (or name a module above them)"
        )
    for key, where in device_map.items():
        try:
            check_available(where if not isinstance(where, int) else f"cuda:{where}")
        except InputError as err:
            raise InputError(f"device_map[{key!r}]: {err}") from None


def _dispatched(hf_model: PreTrainedModel, device_map: str | dict[str, str | int]) -> PreTrainedModel:
    """`hf_model` with its modules placed by `device_map` (accelerate's `dispatch_model`; a named plan
    such as "auto" is worked out by `infer_auto_device_map`, keeping each decoder layer whole)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if not isinstance(device_map, str):
        _check_device_map(hf_model, device_map)
    if isinstance(device_map, str):
        keep_whole = getattr(hf_model, "_no_split_modules", None) or []
        device_map = infer_auto_device_map(hf_model, no_split_module_classes=list(keep_whole))
    return dispatch_model(hf_model, device_map=device_map)


def _check_placement(
    device: str | torch.device | None, device_map: str | dict[str, str | int] | None
) -> None:
    """Refuse a device together with a device map, an unknown plan, an empty map, and a named plan that
    several torchrun processes of one machine would each spread over all of its GPUs."""
    if device_map is None:
        return
    if device is not None:
        raise InputError(
            f"give device ({device}) or device_map ({device_map}), not both: a device map places every layer"
        )
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_PLANS:
            raise InputError(
                f"device_map must be a dict or one of {', '.join(DEVICE_MAP_PLANS)}; got {device_map!r}"
            )
        if local_world_size() > 1 and torch.cuda.is_available():
            raise InputError(
                f"device_map={device_map!r} under torchrun with {local_world_size()} processes on this "
                "machine would spread every process over all of its GPUs: give each process its own GPUs "
                "with a dict device_map, or start one process per machine (--nproc-per-node 1)"
            )
    elif not isinstance(device_map, dict) or not device_map:
        raise InputError(f"device_map must name where each module goes, got {device_map!r}")


def _resolve(
    name_or_model: str | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    dtype: torch.dtype,
    device_map: str | dict[str, str | int] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if isinstance(name_or_model, PreTrainedModel):
        if tokenizer is None:
            raise InputError("load_model(model_object) needs its tokenizer: load_model(model, tokenizer)")
        return private_copy(name_or_model), tokenizer
    if not isinstance(name_or_model, str):
        raise InputError(
            f"load_model takes a model name or a transformers PreTrainedModel, got {type(name_or_model)}"
        )
    if name_or_model.lower() == EMBEDDED_NAME:
        model, embedded_tokenizer = load_embedded()
        return model, tokenizer or embedded_tokenizer
    if name_or_model.lower().endswith(".gguf"):
        model, file_tokenizer = load_gguf(name_or_model)
        return model, tokenizer or file_tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_model, dtype=dtype, device_map=device_map)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(name_or_model)
    except OSError as err:
        raise ModelLoadError(
            f"Could not load '{name_or_model}' from the Hugging Face hub or a local folder ({err}). "
            f"Offline, use the embedded model load_model('{EMBEDDED_NAME}'), a local folder, or a model "
            "object with its tokenizer."
        ) from err
    return model, tokenizer


def private_copy(hf_model: PreTrainedModel) -> PreTrainedModel:
    """A copy of the caller's model for the bridge to take apart: its own modules, config and `Parameter`
    objects, over the caller's weight storage (no weights are copied). Booting the bridge swaps the
    model's layers for wrappers and `load_model` changes mode, dtype and `requires_grad`; on the copy none
    of that reaches the caller's object, which can be loaded again."""
    memo: dict[int, object] = {}
    for param in hf_model.parameters():
        memo[id(param)] = torch.nn.Parameter(param.detach(), requires_grad=param.requires_grad)
    for buffer in hf_model.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(hf_model, memo)


def _boot(
    name: str, hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype
) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    from circuits.models.adapters import register

    register()  # the adapters kept here, for architectures TransformerLens does not wrap
    # The bridge reloads a tokenizer by name unless it already "adds BOS"; give it a copy marked so, which
    # keeps the boot offline. Our own tokenisation (HookedModel.to_ids) uses the caller's tokenizer.
    bridge_tokenizer = copy.copy(tokenizer)
    bridge_tokenizer.init_kwargs = {**tokenizer.init_kwargs, "add_bos_token": True}
    bridge_tokenizer.init_kwargs.setdefault("name_or_path", name)
    if not getattr(hf_model.config, "architectures", None):  # a model built from a config has none
        hf_model.config.architectures = [type(hf_model).__name__]
    hf_model.config.architectures = [_registered_name(a) for a in hf_model.config.architectures or []]
    _restore_moved_attributes(hf_model)
    try:
        return TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=bridge_tokenizer, dtype=dtype
        )
    except Exception as err:  # TransformerLens raises ValueError / KeyError / NotImplementedError alike
        raise UnsupportedModelError(
            f"{name}: TransformerLens {_tl_version()} cannot wrap {type(hf_model).__name__} "
            f"({type(err).__name__}: {' '.join(str(err).split())[:300]})"
        ) from err


def _registered_name(architecture: str) -> str:
    """The class name TransformerLens registers an architecture under, where it spells it otherwise than
    transformers does (`PhimoeForCausalLM` is registered as `PhiMoEForCausalLM`); else `architecture`."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    if architecture in SUPPORTED_ARCHITECTURES:
        return architecture
    spelled = {name.lower(): name for name in SUPPORTED_ARCHITECTURES}
    return spelled.get(architecture.lower(), architecture)


def _restore_moved_attributes(hf_model: PreTrainedModel) -> None:
    """Attributes TransformerLens 4.3's adapters read where transformers 5 no longer keeps them.

    CodeGen's attention layers used to own the rotary table `embed_positions` (it now lives on the model's
    `rotary_emb`: each layer gets a reference, no copy) and the divisor `scale_attn` = sqrt(d_head) (now
    its inverse `scaling`). `check_bridge` then verifies that the bridge computes the model.
    """
    rotary = getattr(getattr(hf_model, "transformer", None), "rotary_emb", None)
    if hf_model.config.model_type != "codegen" or rotary is None:
        return
    for block in hf_model.transformer.h:  # type: ignore[union-attr]
        attn = block.attn
        if not hasattr(attn, "embed_positions"):
            attn.embed_positions = rotary.embed_positions
        if not hasattr(attn, "scale_attn") and hasattr(attn, "scaling"):
            attn.scale_attn = torch.tensor(1.0 / attn.scaling, dtype=torch.float32)


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


def _default_prepend_bos(hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """GPT-2: yes (the TransformerLens / EAP-IG convention); others: what the tokenizer does itself."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    if hf_model.config.model_type == "gpt2":
        return True
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _spec_from_bridge(bridge: Any, name: str) -> ModelSpec:
    if not hasattr(bridge, "blocks"):
        raise UnsupportedModelError(
            f"{name}: the TransformerLens bridge has no layer blocks for this architecture (its adapter maps "
            "it otherwise), so there are no residual-stream layers to build a graph on"
        )
    cfg = bridge.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    d_head = cfg.d_head
    attentions = [dict(block.named_children()).get("attn") for block in bridge.blocks]
    mixers = [
        (mixer_component(block) is not None, a is not None) for block, a in zip(bridge.blocks, attentions)
    ]
    latent = [a._original_component for a in attentions if a is not None and is_latent(a._original_component)]
    if latent:  # every head has its own key and value (`models.latent`); z is v_head_dim wide per head
        n_kv, d_head = cfg.n_heads, int(latent[0].v_head_dim)
    if cfg.n_heads % n_kv:
        raise UnsupportedModelError(
            f"{name}: the bridge reports {cfg.n_heads} attention heads sharing {n_kv} key/value heads, "
            "which is no grouping of heads the graph can express"
        )
    return ModelSpec(
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=n_kv,
        d_model=cfg.d_model,
        d_head=d_head,
        d_mlp=cfg.d_mlp,
        parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
        name=name,
        per_head_sources=not any(
            HookedModel.post_attn_norm_in_hook(layer) in bridge.hook_dict for layer in range(cfg.n_layers)
        ),
        mixer_layers=tuple(i for i, (mixer, attn) in enumerate(mixers) if mixer and not attn),
        parallel_mixer_layers=tuple(i for i, (mixer, attn) in enumerate(mixers) if mixer and attn),
        layers_without_mlp=tuple(
            i
            for i, block in enumerate(bridge.blocks)
            if not {"mlp", "shared_mlp"} & set(dict(block.named_children()))  # Granite-4: shared_mlp
        ),
    )
