"""`HookedModel`: a TransformerLens `TransformerBridge` plus the few facts the engine needs.

This is the one module that spells out hook names. The rest of the library talks about layers, heads and
nodes and asks this adapter for the hook point that carries each of them:

| graph role                      | hook point (bridge name)          | shape                          |
|---------------------------------|-----------------------------------|--------------------------------|
| `input` output                  | `blocks.0.hook_resid_pre`         | [batch, pos, d_model]          |
| head outputs (before W_O)       | `blocks.{l}.attn.o.hook_in`       | [batch, pos, n_heads * d_head] |
| MLP output                      | `blocks.{l}.hook_mlp_out`         | [batch, pos, d_model]          |
| q / k / v projections (pre-RoPE)| `blocks.{l}.attn.{q,k,v}.hook_out`| [batch, pos, n * d_head]       |
| q / k past a norm over all heads| `blocks.{l}.attn.{q,k}_norm.hook_out`| [batch, pos, n * d_head]    |
| q / k / v of latent attention   | `blocks.{l}.attn.hook_{q,k,v}`    | [batch, pos, n * width] (*)    |
| attention-block input (pre-norm)| `blocks.{l}.ln1.hook_in`          | [batch, pos, d_model]          |
| MLP input (pre-norm)            | `blocks.{l}.ln2.hook_in`          | [batch, pos, d_model]          |
| MLP input (normed; shared norm) | `blocks.{l}.mlp.hook_in`          | [batch, pos, d_model]          |
| logits input (pre final norm)   | `ln_final.hook_in`                | [batch, pos, d_model]          |

(*) head-major in the bridge, [batch, n, pos, width]; `hooks` shows them position-major like every other
per-head input.

Parallel blocks with one shared norm (GPT-J, Phi, Falcon-7B, Cohere, CodeGen, StableLM parallel) have no
MLP norm: the MLP reads the attention norm's output, so its destination input is the pre-norm residual seen
through that norm, patched and differentiated at `mlp.hook_in` (`mlp_destination_hook`, `shared_norm_grads`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformers import PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from circuits.errors import InputError, UnsupportedModelError
from circuits.models.latent import LatentAttention, is_latent
from circuits.models.norms import HeadsNorm, ProjectedNorm, norm_form, with_frozen_scale

QKV = Literal["q", "k", "v"]
QKV_LETTERS: tuple[QKV, ...] = ("q", "k", "v")
HookFn = Callable[[Tensor], Tensor | None]


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts of a decoder-only transformer, enough to build its graph."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    parallel_attn_mlp: bool = False
    name: str = ""
    # False for post-norm ("sandwich") blocks, whose attention output passes a norm before the residual
    # stream: head results then do not add into it, and a layer's attention output is one source `a{l}`.
    per_head_sources: bool = True
    # layers whose token mixer is no attention (a state-space, linear-attention or convolution mixer, as
    # in Qwen3.5, Jamba, LFM2): one node `mix{l}` reading the residual through the layer's first norm
    mixer_layers: tuple[int, ...] = ()
    # layers without an MLP (Mamba's blocks: a norm and a mixer alone)
    layers_without_mlp: tuple[int, ...] = ()
    # attention layers with a mixer beside the heads, reading the same norm's output and adding into the
    # same residual stream (Falcon-H1's Mamba mixer): one node `mix{l}` besides the heads
    parallel_mixer_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise InputError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if set(self.mixer_layers) & set(self.parallel_mixer_layers):
            raise InputError(
                f"layers {sorted(set(self.mixer_layers) & set(self.parallel_mixer_layers))} are both mixer "
                "layers (no attention) and attention layers with a mixer beside it"
            )
        for name in ("mixer_layers", "layers_without_mlp", "parallel_mixer_layers"):
            layers = getattr(self, name)
            if any(not 0 <= layer < self.n_layers for layer in layers):
                raise InputError(f"{name} {layers} name layers outside 0..{self.n_layers - 1}")
            object.__setattr__(self, name, tuple(sorted(set(layers))))

    def has_mlp(self, layer: int) -> bool:
        return layer not in self.layers_without_mlp

    def has_attention(self, layer: int) -> bool:
        """Layer `layer`'s token mixer is attention (heads), not one mixer node."""
        return layer not in self.mixer_layers

    def has_mixer(self, layer: int) -> bool:
        """Layer `layer` has a mixer node `mix{l}`: instead of attention, or beside it."""
        return layer in self.mixer_layers or layer in self.parallel_mixer_layers

    @property
    def attention_layers(self) -> list[int]:
        return [layer for layer in range(self.n_layers) if self.has_attention(layer)]

    @property
    def n_attn_sources(self) -> int:
        """Sources per attention layer: one per head, or one for the whole layer."""
        return self.n_heads if self.per_head_sources else 1

    def n_qkv_heads(self, letter: QKV) -> int:
        """Heads with their own projection: n_heads for q, n_kv_heads for k and v."""
        return self.n_heads if letter == "q" else self.n_kv_heads


def linear_weight(module: nn.Module) -> Tensor:
    """Weight of a linear map as [d_out, d_in], for `nn.Linear` and GPT-2's `Conv1D` alike."""
    if isinstance(module, Conv1D):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise UnsupportedModelError(
        f"expected a linear projection (nn.Linear or Conv1D), got {type(module).__name__}: the graph needs "
        "one weight matrix per projection"
    )


# TransformerLens' names for the token mixers of blocks without attention
MIXER_COMPONENTS = ("linear_attn", "mixer", "conv", "mamba")


def mixer_component(block: Any) -> str | None:
    """The name of a bridge block's token mixer that is no attention (`linear_attn` for Qwen3.5's and
    Qwen3-Next's gated delta nets, `mixer` for Jamba's and Bamba's state-space mixers, `conv` for LFM2's
    convolutions, `mamba` for Falcon-H1's, which runs beside attention), or None."""
    children = dict(block.named_children())  # the bridge's components (attribute lookup also finds HF's)
    return next((name for name in MIXER_COMPONENTS if name in children), None)


class HookedModel:
    """A hooked causal LM: the bridge, its tokenizer, its `ModelSpec` and per-head weights.

    Use `model.bridge` for anything TransformerLens offers (run_with_cache, generate, ...).
    """

    def __init__(
        self,
        bridge: Any,
        tokenizer: PreTrainedTokenizerBase,
        spec: ModelSpec,
        prepend_bos: bool,
    ) -> None:
        self.bridge = bridge  # a transformer_lens TransformerBridge (dynamic attributes)
        self.tokenizer = tokenizer
        self.spec = spec
        self.prepend_bos = prepend_bos
        self._hook_points: dict[str, HookPoint] = dict(self.bridge.hook_dict)
        self._projected_norms: dict[tuple[int, str], tuple[tuple, ProjectedNorm]] = {}
        has = self._hook_points.__contains__
        self.mlp_shares_attn_norm = (
            spec.parallel_attn_mlp and not has(self.mlp_norm_in_hook(0)) and has("blocks.0.ln1.hook_in")
        )
        self._plain_models: dict[str | None, tuple[tuple[int, ...], nn.Module]] = {}  # circuits.models.plain
        self._batch_shape: tuple[int, ...] | None = None  # [batch, pos] of the forward pass running
        self.recomputing = False  # a block is running again in the backward pass (`models.recompute`)
        self.source: Any = None  # the Hugging Face model before the bridge wrapped it (`models.ungroup`)
        self.ungrouped: HookedModel | None = None  # the ungrouped twin, once made (`models.ungroup`)
        # q/k/v input gradients in closed form where the norms are verified to have one; False: autograd
        # through `qkv_from_residual` for every head (the reference path, and its cost in benchmarks)
        self.closed_form_pullbacks = True
        self._heads_norms: dict[tuple[int, str], tuple[tuple, HeadsNorm]] = {}
        self._latent: dict[int, LatentAttention | None] = {}
        self._norm_hooks: list[tuple[str, str]] | None = None
        # hook points whose tensors are head-major [batch, heads, pos, width] (latent attention's q / k / v):
        # shown to hooks as [batch, pos, heads * width], as every per-head input is
        self._head_major = {
            self.head_input_hook(layer, letter)
            for layer in spec.attention_layers
            if self.latent_attention(layer) is not None
            for letter in QKV_LETTERS
        }

    # ----------------------------------------------------------------- hook names (the only place)
    input_hook = "blocks.0.hook_resid_pre"
    token_embed_hook = "embed.hook_out"  # token embeddings only (GPT-2 adds positions after it)
    final_norm_in_hook = "ln_final.hook_in"
    unembed_in_hook = "unembed.hook_in"

    @staticmethod
    def head_z_hook(layer: int) -> str:
        return f"blocks.{layer}.attn.o.hook_in"

    @staticmethod
    def mlp_out_hook(layer: int) -> str:
        return f"blocks.{layer}.hook_mlp_out"

    @staticmethod
    def qkv_out_hook(layer: int, letter: QKV) -> str:
        return f"blocks.{layer}.attn.{letter}.hook_out"

    def head_input_hook(self, layer: int, letter: QKV) -> str:
        """Where each head's own q (k, v) input value lives, [batch, pos, n * width]: the projection's
        output, or past a norm over all heads' projections together (`head_input_norm`), its output; with
        latent attention, each head's final q (k, v) after the rotary embedding."""
        if self.latent_attention(layer) is not None:
            return f"blocks.{layer}.attn.hook_{letter}"
        if self.head_input_norm(layer, letter) is not None:
            return f"blocks.{layer}.attn.{letter}_norm.hook_out"
        return self.qkv_out_hook(layer, letter)

    def head_input_norm(self, layer: int, letter: QKV) -> nn.Module | None:
        """The q (k) norm when it normalises all heads' projections together (OLMo-2, OLMoE, MiniMax-M2:
        its width is n * d_head), or None (per-head norms, Qwen3's, do not mix heads).

        Head h's input is then slice_h N(W n(x) + b): still a function of the residual x alone, patched by
        recomputing the projection and N from the patched residual and keeping slice h."""
        if letter == "v" or self.spec.n_qkv_heads(letter) == 1 or self.latent_attention(layer) is not None:
            return None
        norm = self.qk_norm(layer, letter)
        weight = getattr(norm, "weight", None)
        shape = weight.shape if isinstance(weight, Tensor) else getattr(norm, "normalized_shape", None)
        width = self.spec.n_qkv_heads(letter) * self.spec.d_head
        return norm if shape is not None and int(torch.Size(shape).numel()) == width else None

    def attn_norm_in_hook(self, layer: int) -> str:
        """Input of the norm in front of the token mixer (`ln1`, or `norm` in a Mamba block), or of
        attention itself where there is none (OLMo-2)."""
        for norm in ("ln1", "norm"):
            if f"blocks.{layer}.{norm}.hook_in" in self._hook_points:
                return f"blocks.{layer}.{norm}.hook_in"
        return f"blocks.{layer}.attn.hook_in"

    @staticmethod
    def post_attn_norm_in_hook(layer: int) -> str:
        """Input of a post-norm block's norm on the attention output (Gemma-2, OLMo-2), if it has one."""
        return f"blocks.{layer}.ln1_post.hook_in"

    @staticmethod
    def mlp_norm_in_hook(layer: int) -> str:
        return f"blocks.{layer}.ln2.hook_in"

    @staticmethod
    def mlp_in_hook(layer: int) -> str:
        """The MLP's own input (after whatever norm it reads through), [batch, pos, d_model]."""
        return f"blocks.{layer}.mlp.hook_in"

    def mlp_destination_hook(self, layer: int) -> str:
        """Where the MLP destination's input is patched and its gradient read: the input of the MLP's own
        norm; or the MLP's input, which is the residual itself for an MLP without a norm in front (OLMo-2)
        and the attention norm's output for an MLP sharing it (then see `shared_norm_grads`)."""
        own = self.mlp_norm_in_hook(layer)
        return own if own in self._hook_points else self.mlp_in_hook(layer)

    @staticmethod
    def mlp_post_hook(layer: int) -> str:
        """MLP hidden activations (input of the down projection), [batch, pos, d_mlp]."""
        return f"blocks.{layer}.mlp.hook_post"

    @staticmethod
    def resid_pre_hook(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_pre"

    @staticmethod
    def resid_post_hook(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_post"

    @staticmethod
    def attn_pattern_hook(layer: int) -> str:
        """Attention probabilities, [batch, n_heads, query pos, key pos]."""
        return f"blocks.{layer}.attn.hook_pattern"

    def norm_hooks(self) -> list[tuple[str, str]]:
        """(input, output) hook points of every normalisation component of the bridge: those with a scale
        hook (the blocks' norms, q/k norms, the final norm), and a norm the bridge wraps as a generic
        component (Youtu's query-latent norm), found by what its module computes."""
        if self._norm_hooks is None:
            named = [
                (name.replace(".hook_scale", ".hook_in"), name.replace(".hook_scale", ".hook_out"))
                for name in self._hook_points
                if name.endswith(".hook_scale")
                and name.replace(".hook_scale", ".hook_in") in self._hook_points
            ]
            self._norm_hooks = named + self._generic_norm_hooks({a for a, _ in named})
        return self._norm_hooks

    def _generic_norm_hooks(self, known: set[str]) -> list[tuple[str, str]]:
        """(input, output) hooks of components without a scale hook whose module has one weight vector
        (and maybe a bias) and computes a LayerNorm or RMSNorm with it (`norms.norm_form`)."""
        found = []
        for hook in self._hook_points:
            name = hook.removesuffix(".hook_in")
            hooks = (hook, f"{name}.hook_out")
            if name == hook or hook in known or hooks[1] not in self._hook_points:
                continue
            module = getattr(self.bridge.get_submodule(name), "_original_component", None)
            if not isinstance(module, nn.Module):
                continue
            params = dict(module.named_parameters())
            weight = params.get("weight")
            if weight is None or weight.dim() != 1 or set(params) - {"weight", "bias"}:
                continue
            if norm_form(module, weight.numel()) is not None:
                found.append(hooks)
        return found

    @staticmethod
    def norm_component(in_hook: str) -> str:
        """The bridge component of a norm's input hook (`blocks.0.ln1.hook_in` -> `blocks.0.ln1`)."""
        return in_hook.removesuffix(".hook_in")

    def mlp_activation_hooks(self, layer: int) -> tuple[str, str | None, str]:
        """(activation input z, up projection output u or None, output projection input h) of an MLP
        computing h = act(z) (* u when gated); a name may be missing where the bridge has no such hook."""
        base = f"blocks.{layer}.mlp"
        # dense_: a dense layer of a model mixing dense and expert layers (Laguna); shared_mlp: Granite-4's
        for mlp in (f"{base}.", f"{base}.dense_", f"blocks.{layer}.shared_mlp."):
            if f"{mlp}gate.hook_out" in self._hook_points:
                return f"{mlp}gate.hook_out", f"{mlp}in.hook_out", f"{mlp}out.hook_in"
        return f"{base}.in.hook_out", None, f"{base}.out.hook_in"

    @property
    def tokenizer_signature(self) -> tuple[int, tuple[int, ...]]:
        """(vocabulary size, the ids of a probe text): what prompt pairs remember of the tokenizer that made
        them, so that another model's tokenizer can refuse them."""
        probe = "Then Tom said hello to Mary. 12 + 7 = 19; Paris, über, 東京"
        return len(self.tokenizer), tuple(self.tokenizer(probe, add_special_tokens=False)["input_ids"])

    def has_hook(self, name: str) -> bool:
        return name in self._hook_points

    @staticmethod
    def attn_scores_hook(layer: int) -> str:
        """Attention scores as the softmax reads them (masked), [batch, n_heads, query pos, key pos]."""
        return f"blocks.{layer}.attn.hook_attn_scores"

    def qk_score_input_hook(self, layer: int, letter: Literal["q", "k"]) -> str:
        """Where q (k) last is a tensor of the projection's own: after its q/k norm if there is one
        ([batch, heads, pos, d_head]), else the projection output ([batch, pos, heads * d_head])."""
        normed = f"blocks.{layer}.attn.{letter}_norm.hook_out"
        return normed if normed in self._hook_points else self.qkv_out_hook(layer, letter)

    def qk_norm(self, layer: int, letter: Literal["q", "k"]) -> nn.Module | None:
        """The per-head q (k) norm (the Hugging Face module), or None."""
        attn = getattr(self._block(layer), "attn", None)  # a block without attention has none
        norm = getattr(attn, f"{letter}_norm", None)
        return None if norm is None else getattr(norm, "_original_component", norm)

    def attn_out_hook(self, layer: int) -> str:
        """Where the layer's token mixer's output enters the residual stream: the attention output, or a
        mixer layer's output (`mixer_out_hook`)."""
        return (
            f"blocks.{layer}.hook_attn_out" if self.spec.has_attention(layer) else self.mixer_out_hook(layer)
        )

    def mixer_in_hook(self, layer: int) -> str:
        """A mixer layer's mixer input (the first norm's output), [batch, pos, d_model]."""
        return f"blocks.{layer}.{self.mixer_component(layer)}.hook_in"

    def mixer_component(self, layer: int) -> str | None:
        """The bridge component of a layer's mixer node (`linear_attn`, `mixer`, `conv`, `mamba`), or None
        for an attention layer without one."""
        if not self.spec.has_mixer(layer):
            return None
        return mixer_component(self.bridge.blocks[layer])

    def mixer_out_hook(self, layer: int) -> str:
        """Where a mixer node's output enters the residual stream, [batch, pos, d_model]."""
        return f"blocks.{layer}.{self.mixer_component(layer)}.hook_out"

    # ----------------------------------------------------------------------------- modules, weights
    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    def layer_device(self, layer: int) -> torch.device:
        """Where block `layer` runs (its parameters' device; differs by layer under a device map)."""
        return next(self._block(layer).parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.bridge.parameters()).dtype

    @property
    def parameter_bytes(self) -> int:
        """Memory of the model's parameters (each shared tensor once)."""
        return sum(p.numel() * p.element_size() for p in self.bridge.parameters())

    @property
    def d_vocab(self) -> int:
        return int(self.bridge.cfg.d_vocab)

    @property
    def n_ctx(self) -> int | None:
        """Longest sequence the model can attend over (None when the config sets no limit)."""
        n = getattr(self.bridge.cfg, "n_ctx", None)
        return int(n) if n else None

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Within the block: eval mode (no dropout) and no parameter gradients; afterwards every module's
        mode and every parameter's `requires_grad` are as the caller left them."""
        # the bridge's modules and the wrapped Hugging Face model's: some (GPT-2's embedding dropout) are
        # called by the wrapped model without being registered under the bridge
        modules = {id(m): m for m in (*self.bridge.modules(), *self.bridge.original_model.modules())}
        training = [m for m in modules.values() if m.training]
        trainable = [p for p in self.bridge.parameters() if p.requires_grad]
        for module in training:
            module.training = False
        for param in trainable:
            param.requires_grad_(False)
        try:
            yield
        finally:
            for module in training:
                module.training = True
            for param in trainable:
                param.requires_grad_(True)

    def _block(self, layer: int) -> Any:
        return self.bridge.blocks[layer]

    def attn_norm(self, layer: int) -> nn.Module:
        """The norm in front of the token mixer (the Hugging Face module, no hooks); identity if there is
        none."""
        children = dict(self._block(layer).named_children())
        norm = children.get("ln1", children.get("norm"))
        return nn.Identity() if norm is None else norm._original_component

    def W_qkv(self, layer: int, letter: QKV) -> Tensor:
        """Per-head weights of everything head h's q (k, v) input feeds, [n, width, d_model] (n = n_heads
        for q, n_kv_heads for k/v): the projection's slice (d_head wide, or 2 d_head for a q projection that
        also computes each head's output gate, Qwen3.5's), and for q, where the heads' output gates have a
        projection of their own (AFMoE, Laguna: `head_gate_hook`), that projection's slice after it."""
        w = linear_weight(self._projection(layer, letter))
        per_head = w.reshape(self.spec.n_qkv_heads(letter), -1, self.spec.d_model)
        gate = self._gate_projection(layer) if letter == "q" else None
        if gate is None:
            return per_head
        return torch.cat((per_head, linear_weight(gate).reshape(self.spec.n_heads, -1, self.spec.d_model)), 1)

    def b_qkv(self, layer: int, letter: QKV) -> Tensor | None:
        """Per-head biases [n, width] of what `W_qkv` projects with (zeros for a part without), or None."""
        parts = [self._projection(layer, letter)]
        gate = self._gate_projection(layer) if letter == "q" else None
        parts += [] if gate is None else [gate]
        if all(not isinstance(p.bias, Tensor) for p in parts):
            return None
        n = self.spec.n_qkv_heads(letter)
        return torch.cat(
            [
                p.bias.reshape(n, -1)
                if isinstance(p.bias, Tensor)
                else linear_weight(p).new_zeros(n, linear_weight(p).shape[0] // n)
                for p in parts
            ],
            1,
        )

    def head_gate_hook(self, layer: int) -> str | None:
        """Where the heads' output gates are computed by a projection of their own from the normed residual
        (AFMoE's `gate_proj`, Laguna's `g_proj`; [batch, pos, n_heads * gate width]), or None. Head h's q
        input is the residual its query and its gate are both computed from: patching it recomputes both,
        and its gradient is the sum of both paths (as for Qwen3.5, whose q projection computes the gate)."""
        return None if self._gate_projection(layer) is None else f"blocks.{layer}.attn.gate.hook_out"

    def gate_width(self, layer: int) -> int:
        """Values per head at `head_gate_hook` (d_head for AFMoE, 1 for Laguna's scalar gates), 0 without."""
        gate = self._gate_projection(layer)
        return 0 if gate is None else int(linear_weight(gate).shape[0]) // self.spec.n_heads

    def _gate_projection(self, layer: int) -> nn.Module | None:
        attn = dict(self._block(layer).named_children()).get("attn")
        gate = None if attn is None else dict(attn.named_children()).get("gate")
        return None if gate is None else gate._original_component  # type: ignore[no-any-return]

    def split_gate(self, layer: int, values: Tensor) -> tuple[Tensor, Tensor]:
        """Head queries and gates, each [..., n_heads * width] as their hooks hold them, from q inputs'
        values [..., n_heads, d_head + gate width] (`qkv_from_residual(layer, "q", ...)`)."""
        d = self.qkv_width(layer, "q")
        return values[..., :d].flatten(-2), values[..., d:].flatten(-2)

    def join_gate(self, q: Tensor, gate: Tensor) -> Tensor:
        """Per-head q values (or gradients) [..., n_heads * d_head] and gate values [..., n_heads * w] as
        one per-head input, [..., n_heads * (d_head + w)] (head by head, the layout of `W_qkv`)."""
        n = self.spec.n_heads
        return torch.cat((q.unflatten(-1, (n, -1)), gate.unflatten(-1, (n, -1))), -1).flatten(-2)

    def qkv_width(self, layer: int, letter: QKV) -> int:
        """Values per head at `head_input_hook` (the q, k or v projection's output): d_head, or 2 d_head where
        the q projection computes each head's query and output gate together (Qwen3.5, Qwen3-Next: head h's
        q input is the residual both are computed from); with latent attention, the widths of its heads' q,
        k and v. (A gate from a projection of its own is not counted: `head_gate_hook`.)"""
        latent = self.latent_attention(layer)
        if latent is not None:
            return latent.width(letter)
        return int(linear_weight(self._projection(layer, letter)).shape[0]) // self.spec.n_qkv_heads(letter)

    def latent_attention(self, layer: int) -> LatentAttention | None:
        """The layer's multi-head latent attention (DeepSeek-V2 / V3), or None for any other."""
        if layer not in self._latent:  # found once per layer (None included)
            attn = getattr(self._block(layer), "attn", None)
            hf = None if attn is None else attn._original_component
            found = None
            if hf is not None and is_latent(hf):
                found = LatentAttention(hf, self.bridge.rotary_emb._original_component)
            self._latent[layer] = found
        return self._latent[layer]

    def qkv_from_residual(self, layer: int, letter: QKV, resid: Tensor) -> Tensor:
        """Each head's q (k, v) input value computed from its own residual stream: [b, P, n, width] from
        resid [b, P, n, d_model], through the attention norm and W[h] (+ bias) alone; past a norm over all
        heads (`head_input_norm`), head h's slice of N(W norm(resid_h) + b), the full width per head; with
        latent attention, head h's q (k, v) through the latent projections and the rotary embedding."""
        heads_norm = self.head_input_norm(layer, letter)
        normed = self.attn_norm(layer)(resid)
        latent = self.latent_attention(layer)
        if latent is not None:
            return latent(letter, normed)
        if heads_norm is None:
            out = torch.einsum("bpnd,nhd->bpnh", normed, self.W_qkv(layer, letter))
            bias = self.b_qkv(layer, letter)
            return out if bias is None else out + bias
        n = resid.shape[2]
        full = heads_norm(self._projection(layer, letter)(normed))  # [b, P, n (residuals), n * d_head]
        return full.view(*full.shape[:3], n, -1).diagonal(dim1=2, dim2=3).movedim(-1, 2)

    def _projection(self, layer: int, letter: QKV) -> nn.Module:
        """The q (k, v) projection of all heads (the Hugging Face module)."""
        return getattr(self._block(layer).attn, letter)._original_component  # type: ignore[no-any-return]

    def W_O(self, layer: int) -> Tensor:
        """Per-head output weights [n_heads, d_head, d_model]: head h's result z_h @ W_O[h] is what it adds
        to the residual stream (times the block's residual multiplier where it has one: Granite)."""
        w = linear_weight(self._block(layer).attn.o._original_component)  # [d_model, n_heads*d_head]
        w = w.T.reshape(self.spec.n_heads, self.spec.d_head, self.spec.d_model)
        scale = self._residual_scale(layer)
        return w if scale == 1.0 else w * scale

    def head_results(self, layer: int, z: Tensor, heads: Tensor | None = None) -> Tensor:
        """Head results z_h W_O[h], as they enter the residual stream.

        Args:
            z: [b, P, n_heads * d_head] the output projection's input (`head_z_hook`).
            heads: optional [n] indices of the heads wanted (default: all).
        Returns:
            [b, P, n, d_model].
        """
        z = z.reshape(*z.shape[:2], self.spec.n_heads, self.spec.d_head)
        w = self.W_O(layer)
        if heads is not None:
            z, w = z[:, :, heads], w[heads]
        return torch.einsum("bpnh,nhd->bpnd", z, w.to(z.dtype))

    def b_O(self, layer: int) -> Tensor | None:
        """The output projection's bias [d_model] as added to the residual stream, or None."""
        bias = self._block(layer).attn.o._original_component.bias
        scale = self._residual_scale(layer)
        return None if not isinstance(bias, Tensor) else bias if scale == 1.0 else bias * scale

    def layer_scalars(self) -> list[float] | None:
        """The factor s_l by which each layer multiplies the whole residual stream after adding its outputs
        (Gemma-4's learned `layer_scalar`: resid_{l+1} = s_l (resid_l + attn_l + mlp_l)), or None where
        every layer has none or 1. A source written in layer j then reaches a destination reading the
        residual at layer m scaled by s_j ... s_{m-1} (`wiring.residual_factors`)."""
        scalars = []
        for layer in range(self.spec.n_layers):
            scalar = getattr(self._block(layer)._original_component, "layer_scalar", None)
            scalars.append(float(scalar.reshape(-1)[0]) if isinstance(scalar, Tensor) else 1.0)
        if all(s == 1.0 for s in scalars):
            return None
        if any(s == 0.0 for s in scalars):
            raise UnsupportedModelError(
                f"{self.spec.name}: a layer scalar is 0, which erases the residual stream: no edge into a "
                "later layer has an effect to score"
            )
        return scalars

    def _residual_scale(self, layer: int) -> float:
        """The factor a block applies to its attention / MLP outputs before adding them (Granite's
        residual multiplier; the bridge's hook_attn_out and hook_mlp_out carry the scaled values)."""
        return float(getattr(self._block(layer), "residual_contribution_scale", 1.0))

    def mixer_scale(self, layer: int) -> float:
        """The factor a block applies to its mixer node's hooked output (`mixer_out_hook`) before adding it
        to the residual stream: Granite-4's residual multiplier, which the bridge applies to the attention
        and MLP hooks it declares but not to its Mamba mixer's; 1 elsewhere."""
        return self._residual_scale(layer) if self.spec.has_mixer(layer) else 1.0

    def attn_input_grads(
        self,
        layer: int,
        resid: Tensor,
        grad_proj: Sequence[Tensor],
        weights: Tensor | None = None,
        out: Tensor | None = None,
        frozen_scale: bool = False,
    ) -> Tensor:
        """Gradient at each head's own q, k and v input from the gradients at the projection outputs.

        The q (k, v) input of head h is the residual stream `resid` seen through the block's norm and
        W_Q[h] alone, so its gradient is norm_vjp(W_Q[h]^T g_h): no split per-head forward copies.

        Args:
            resid: [K * b, P, d_model] input of the attention norm (K integration steps, step-major).
            grad_proj: gradients at the q, k and v projection outputs, each [K * b, P, n * width].
            weights: [K] step weights to sum the steps with (default: one step, weight 1).
            out: optional contiguous storage for n_heads + 2 n_kv_heads rows of b * P * d_model values.
            frozen_scale: the norm's scale held constant (RelP's LN rule).
        Returns:
            [b, P, n_heads + 2 n_kv_heads, d_model]: the q heads, then the k heads, then the v heads (a
            view of head-major storage).
        """
        spec = self.spec
        weights = torch.ones(1, device=resid.device) if weights is None else weights
        starts = [0, spec.n_heads, spec.n_heads + spec.n_kv_heads, spec.n_heads + 2 * spec.n_kv_heads]
        grads = [g.reshape(*g.shape[:2], starts[i + 1] - starts[i], -1) for i, g in enumerate(grad_proj)]
        corrections: list[tuple[slice, list[tuple[Tensor, Tensor]]]] = []
        by_autograd: list[tuple[slice, QKV, Tensor]] = []
        latent = self.latent_attention(layer) is not None  # no projection matrices: autograd throughout
        for i, letter in enumerate(QKV_LETTERS):
            rows = slice(starts[i], starts[i + 1])
            heads_norm = self._heads_norm(layer, letter)
            if (
                latent
                or not self.closed_form_pullbacks
                or (heads_norm is not None and heads_norm.form is None)
            ):
                by_autograd.append((rows, letter, grads[i]))
                grads[i] = torch.zeros_like(grads[i])
            elif heads_norm is not None:
                y = self._projection(layer, letter)(self.attn_norm(layer)(resid))
                w = self.W_qkv(layer, letter)
                grads[i], terms = heads_norm.pull_back(y, grads[i], w, frozen_scale)
                corrections.append((rows, terms))
        if len({g.shape[-1] for g in grads}) == 1 and not latent:  # one width: all heads' pull-backs at once
            result = self._projected_norm(layer, "qkv").vjp(
                resid, torch.cat(grads, 2), weights, out, frozen_scale
            )
        else:  # widths differ (a q projection computing gates, latent attention): one letter at a time
            b, p, d = resid.shape[0] // weights.shape[0], resid.shape[1], resid.shape[2]
            dtype = torch.promote_types(grads[0].dtype, torch.float32) if out is None else out.dtype
            rows_of = (
                out
                if out is not None
                else torch.empty(starts[-1], b * p * d, dtype=dtype, device=resid.device)
            )
            storage = rows_of.view(starts[-1], -1)
            by_letter = {letter for _, letter, _ in by_autograd}
            for i, letter in enumerate(QKV_LETTERS):
                if letter not in by_letter:
                    part = storage[starts[i] : starts[i + 1]]
                    self._projected_norm(layer, letter).vjp(resid, grads[i], weights, part, frozen_scale)
            result = storage.view(starts[-1], b, p, d).permute(1, 2, 0, 3)
        step_weights = weights.to(resid.device, result.dtype).view(-1, 1, 1, 1, 1)
        for rows, terms in corrections:  # the terms shared by all heads, pulled back through the norm
            for coefficients, vector in terms:
                pulled = self._projected_norm(layer, "mlp").vjp(
                    resid, vector.unsqueeze(2), torch.ones(1, device=resid.device), frozen_scale=frozen_scale
                )[:, :, 0]  # [K * b, P, d], per step
                k = weights.shape[0]
                per_step = coefficients.reshape(k, -1, *coefficients.shape[1:]).to(result.dtype)
                result[:, :, rows] += torch.einsum(
                    "kbpn,kbpd->bpnd",
                    (step_weights[..., 0] * per_step),
                    pulled.reshape(k, -1, *pulled.shape[1:]),
                )
        for rows, letter, g in by_autograd:
            result[:, :, rows] = self._autograd_head_grads(layer, letter, resid, g, weights, frozen_scale).to(
                result.dtype
            )
        return result

    def _autograd_head_grads(
        self, layer: int, letter: QKV, resid: Tensor, grads: Tensor, weights: Tensor, frozen_scale: bool
    ) -> Tensor:
        """sum_k weights[k] (d q_h / d x)(x_k)^T g_{k,h} for each head h, by autograd through
        `qkv_from_residual` on a copy of the residual per head: [b, P, n, d] from resid [K * b, P, d] and
        grads [K * b, P, n, width]; with `frozen_scale`, every norm on the way with its scale constant."""
        n = grads.shape[2]
        frozen = self._frozen_norms(layer, letter) if frozen_scale else nullcontext()
        with torch.enable_grad(), frozen:
            x = resid.detach().unsqueeze(2).expand(-1, -1, n, -1).contiguous().requires_grad_(True)
            values = self.qkv_from_residual(layer, letter, x)
            (full,) = torch.autograd.grad(values, x, grads.to(values.dtype))
        full = full.reshape(weights.shape[0], -1, *full.shape[1:])
        return (weights.to(full.device, full.dtype).view(-1, 1, 1, 1, 1) * full).sum(0)

    @contextmanager
    def _frozen_norms(self, layer: int, letter: QKV) -> Iterator[None]:
        """Within the block, every norm between the residual and the layer's heads' inputs (the attention
        norm, a q/k norm, latent attention's latent norms) computes its output with its scale held
        constant in the backward pass (RelP's LN rule, `norms.with_frozen_scale`)."""
        inside = (self.norm_component(self.attn_norm_in_hook(layer)), f"blocks.{layer}.attn.")
        handles = []
        try:
            for in_hook, _ in self.norm_hooks():
                name = self.norm_component(in_hook)
                if name != inside[0] and not name.startswith(inside[1]):
                    continue
                module = self.bridge.get_submodule(name)._original_component
                width = getattr(module, "weight", None)
                form = norm_form(module, width.numel() if isinstance(width, Tensor) else self.spec.d_model)
                if form is None:
                    raise UnsupportedModelError(
                        f"{self.spec.name}: layer {layer}'s {letter} heads read the residual through {name}, "
                        "which is neither a LayerNorm nor an RMSNorm, so RelP's LN rule (its scale held "
                        "constant) cannot be applied to it"
                    )
                handles.append(
                    module.register_forward_hook(lambda _m, a, y, f=form: with_frozen_scale(f, a[0], y))
                )
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _heads_norm(self, layer: int, letter: QKV) -> HeadsNorm | None:
        """`HeadsNorm` of the layer's q (k) norm over all heads, made once, or None."""
        norm = self.head_input_norm(layer, letter)
        if norm is None:
            return None
        key = tuple((t.data_ptr(), t._version) for t in norm.parameters())
        cached = self._heads_norms.get((layer, letter))
        if cached is None or cached[0] != key:
            cached = (key, HeadsNorm(norm, self.spec.n_qkv_heads(letter) * self.spec.d_head))
            self._heads_norms[layer, letter] = cached
        return cached[1]

    def shared_norm_grads(
        self, layer: int, resid: Tensor, grad: Tensor, weights: Tensor, frozen_scale: bool = False
    ) -> Tensor:
        """With a shared norm: the gradient at `mlp_in_hook` pulled back to the residual, summed over steps.

        Args:
            resid: [K * b, P, d_model] input of the attention norm (K integration steps, step-major).
            grad: [K * b, P, d_model] gradient at the MLP input.
            weights: [K] step weights.
            frozen_scale: the norm's scale held constant (RelP's LN rule).
        Returns:
            [b, P, d_model] (float32, or float64 for float64 gradients).
        """
        norm = self._projected_norm(layer, "mlp")
        return norm.vjp(resid, grad.unsqueeze(2), weights, frozen_scale=frozen_scale)[:, :, 0]

    def _projected_norm(self, layer: int, reader: Literal["qkv", "q", "k", "v", "mlp"]) -> ProjectedNorm:
        """The layer's attention norm with its readers' weights folded in (the q/k/v heads, one letter's, or
        the identity for an MLP sharing the norm), rebuilt when a weight changes."""
        norm = self.attn_norm(layer)
        letters: tuple[QKV, ...] = QKV_LETTERS if reader == "qkv" else () if reader == "mlp" else (reader,)
        readers = [self._projection(layer, letter) for letter in letters]
        readers += [gate] if "q" in letters and (gate := self._gate_projection(layer)) is not None else []
        params = [p for module in (*readers, norm) for p in module.parameters()]  # what `W_qkv` reads
        key = tuple((t.data_ptr(), t._version) for t in params)
        cached = self._projected_norms.get((layer, reader))
        if cached is None or cached[0] != key:
            weights = [self.W_qkv(layer, letter) for letter in letters]
            eye = torch.eye(self.spec.d_model, device=self.device, dtype=self.dtype)[None]
            cached = (key, ProjectedNorm(norm, torch.cat(weights) if weights else eye))
            self._projected_norms[layer, reader] = cached
        return cached[1]

    # ------------------------------------------------------------------------------------ running
    def hook_point(self, name: str) -> HookPoint:
        try:
            return self._hook_points[name]
        except KeyError:
            raise UnsupportedModelError(
                f"{self.spec.name}: the TransformerLens bridge has no hook point '{name}', so this "
                "architecture's blocks do not expose what the edge graph reads"
            ) from None

    @contextmanager
    def hooks(self, hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
        """Run with forward hooks `fn(activation) -> replacement | None`; always removed on exit.

        Hooks go through TransformerLens' own `HookPoint.add_hook`, so that hook points which fire only
        when hooked (Granite's scaled residual contributions) see them."""
        added: list[tuple[HookPoint, Any]] = []
        try:
            for name, fn in hooks:
                point = self.hook_point(name)
                added.append((point, point.add_hook(self._as_lens_hook(fn, name in self._head_major))))
            yield
        finally:
            for point, handle in added:
                handle.hook.remove()
                point.fwd_hooks.remove(handle)

    @contextmanager
    def capture(self, names: Sequence[str], clone: bool = False) -> Iterator[dict[str, Tensor]]:
        """Run with hooks keeping the activation at each hook point of `names`, detached (and cloned, for
        one that is changed in place later), in the dict yielded: `with model.capture([name]) as acts:`.
        A hook point that fires more than once keeps its last value."""
        captured: dict[str, Tensor] = {}

        def keep(name: str) -> HookFn:
            def hook(x: Tensor) -> None:
                captured[name] = x.detach().clone() if clone else x.detach()

            return hook

        with self.hooks([(name, keep(name)) for name in names]):
            yield captured

    @property
    def longest_exact_prompt(self) -> int | None:
        """The most positions a prompt may have for the graph to be exact, or None for no limit: DeepSeek
        sparse attention (GLM-MoE-DSA) picks each query's top-k keys by an indexer the graph has no node
        for, which changes nothing while a prompt has at most k positions."""
        limits = [
            latent.longest_exact_prompt
            for layer in self.spec.attention_layers
            if (latent := self.latent_attention(layer)) is not None
            and latent.longest_exact_prompt is not None
        ]
        return min(limits) if limits else None

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits [batch, pos, d_vocab] (no key-value cache is kept)."""
        limit = self.longest_exact_prompt
        if limit is not None and input_ids.shape[1] > limit:
            raise UnsupportedModelError(
                f"{self.spec.name}: prompts of {input_ids.shape[1]} positions; its sparse attention lets "
                f"each query attend to its top {limit} keys only, chosen by an indexer the graph has no node "
                f"for, so scores are exact only for prompts of at most {limit} positions"
            )
        self._batch_shape = tuple(input_ids.shape)
        try:
            return self.bridge(input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self._batch_shape = None

    def _as_lens_hook(self, fn: HookFn, head_major: bool = False) -> Callable[..., Tensor | None]:
        """A TransformerLens hook `hook(activation, hook=point)` calling fn on the activation as the module
        computed it: a hook point's shape conversion (q/k/v split into heads) is undone for fn and redone
        on its result, an activation a block flattens to [batch * pos, d] (OPT's MLP) is shown to fn
        as [batch, pos, d], and a head-major one [batch, heads, pos, width] (latent attention's q / k / v)
        as [batch, pos, heads * width]."""
        if head_major:

            def inner(x: Tensor) -> Tensor | None:
                heads = x.shape[1]
                result = fn(x.transpose(1, 2).flatten(2))
                return None if result is None else result.unflatten(2, (heads, -1)).transpose(1, 2)

            return self._as_lens_hook(inner)

        def hook(output: Tensor, hook: Any) -> Tensor | None:
            conversion = hook.hook_conversion
            raw = output if conversion is None else conversion.revert(output)
            shape = self._batch_shape
            flat = shape is not None and raw.dim() == 2 and raw.shape[0] == shape[0] * shape[1]
            result = fn(raw.view(*shape, raw.shape[-1]) if flat else raw)  # type: ignore[misc]
            if result is None:
                return None
            if flat:
                result = result.reshape(raw.shape)
            return result if conversion is None else conversion.convert(result)

        return hook

    def to_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with BOS first when `prepend_bos`."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if self.prepend_bos:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise InputError(f"{self.spec.name}: prepend_bos=True but the tokenizer has no BOS token")
            ids = [[bos, *row] for row in ids]
        return ids

    def to_tokens(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids [N, P] of `texts` as the toolkit's prompts are made (`PromptPairs.from_strings`: BOS
        first when `prepend_bos`, right-padded) and their attention mask [N, P], for follow-up analysis on
        the positions that were attributed. The bridge's own `model.bridge.to_tokens` follows
        TransformerLens's start-token rule, which may differ (SmolLM2: it prepends `<|im_start|>`)."""
        rows = self.to_ids([texts] if isinstance(texts, str) else list(texts))
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        ids = torch.full((len(rows), width), 0 if pad is None else int(pad), dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    def run_with_cache(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, names: Sequence[str] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits [N, P, d_vocab] and the activations at hook points `names` (default: every one), in one
        forward pass without gradients, e.g. on `pairs.clean` with `pairs.attention_mask` or on
        `to_tokens(texts)`: the ids, mask and hooks the attribution ran with."""
        with torch.no_grad(), self.capture(list(self._hook_points) if names is None else names) as cache:
            logits = self(
                input_ids.to(self.device), None if attention_mask is None else attention_mask.to(self.device)
            )
        return logits, dict(cache)

    def single_token_id(self, text: str) -> int:
        """Id of `text` if it is exactly one token (no BOS), else a ValueError naming the pieces."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]  # as text, not byte-level glyphs ('ĠBuenos')
            raise InputError(f"{text!r} is {len(ids)} tokens {pieces} for {self.spec.name}, not one")
        return int(ids[0])

    def missing_leading_space(self, answer: str) -> bool:
        """True when the word `answer` has no leading space though its spaced form is one token, as a word
        after another word is for byte-level tokenizers (' Mary'): 'Mary' is then rarely what comes next.
        Answers that do not start with a letter (digits continuing a number, punctuation) are not words."""
        if not answer or not answer[0].isalpha():
            return False
        return len(self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) == 1

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"HookedModel({s.name!r}: {s.n_layers} layers, {s.n_heads} heads ({s.n_kv_heads} kv), "
            f"d_model={s.d_model}, d_mlp={s.d_mlp})"
        )


F = TypeVar("F", bound=Callable[..., Any])


def uses_model(fn: F) -> F:
    """Run `fn(model, ...)` under `model.inference()`: no dropout, no gradients on the caller's parameters."""

    @functools.wraps(fn)
    def wrapper(model: HookedModel, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(model, HookedModel):
            raise InputError(
                f"{fn.__name__} takes a HookedModel first (from circuits.load_model), got "
                f"{type(model).__name__}"
            )
        with model.inference():
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
