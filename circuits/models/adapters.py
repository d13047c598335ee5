"""TransformerLens adapters for decoder-only architectures that TransformerLens 4.3 does not wrap, written
like its own (an `ArchitectureAdapter` subclass mapping bridge components to Hugging Face module names) so
that they could go upstream. `register()` adds them to TransformerLens' factory; `load_model` calls it, and
`check_bridge` then verifies for every model that the bridge computes the Hugging Face model.

- Helium (Kyutai): Llama's modules, but interleaved rotary embeddings, which TransformerLens' own
  reimplementation of Llama attention does not apply: the attention runs Hugging Face's forward
  (`maintain_native_attention`), hooked at its q / k / v / o projections.
- Persimmon (Adept): one fused projection laid out head by head ([q_h | k_h | v_h] for each head h), a
  LayerNorm per head on q and k, partial rotary embeddings, a squared-ReLU MLP. `prepare_model` splits the
  fused projection into three linear maps whose outputs it interleaves as before (the same function, now
  with a q, a k and a v to hook); the attention runs Hugging Face's forward.
- BioGPT (Microsoft): OPT's pre-norm layout under other names (learned positions offset by 2, scaled
  token embeddings, a plain GELU MLP); the attention runs Hugging Face's forward.
- Granite-4 hybrid (IBM): TransformerLens' own adapter, with its rotary-embedding component mapped only
  where the model has rotary embeddings (Granite-4.0-H has none, and the original fails to run it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.factories import architecture_adapter_factory as factory
from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
from transformer_lens.model_bridge.generalized_components import (
    AttentionBridge,
    BlockBridge,
    EmbeddingBridge,
    LinearBridge,
    MLPBridge,
    NormalizationBridge,
    PosEmbedBridge,
    RotaryEmbeddingBridge,
    UnembeddingBridge,
)
from transformer_lens.model_bridge.supported_architectures.granite_moe_hybrid import (
    GraniteMoeHybridArchitectureAdapter,
)
from transformer_lens.model_bridge.supported_architectures.llama import LlamaArchitectureAdapter

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def _native_attention(cfg: Any, names: tuple[str, str, str, str] = QKVO) -> AttentionBridge:
    """`self_attn` run by Hugging Face's own forward, hooked at its q, k, v and output projections."""
    return AttentionBridge(
        name="self_attn",
        config=cfg,
        submodules={letter: LinearBridge(name=name) for letter, name in zip("qkvo", names)},
        maintain_native_attention=True,
        requires_attention_mask=True,
    )


def _layer_norm(name: str, cfg: Any) -> NormalizationBridge:
    return NormalizationBridge(name=name, config=cfg, use_native_layernorm_autograd=True)


def _plain_mlp(cfg: Any, name: str | None, up: str, down: str) -> MLPBridge:
    return MLPBridge(
        name=name, config=cfg, submodules={"in": LinearBridge(name=up), "out": LinearBridge(name=down)}
    )


def _layer_norm_defaults(cfg: Any, positions: str) -> None:
    cfg.normalization_type = "LN"
    cfg.positional_embedding_type = positions
    cfg.final_rms = False
    cfg.gated_mlp = False
    cfg.attn_only = False


class HeliumArchitectureAdapter(LlamaArchitectureAdapter):
    """Helium: Llama's layout, interleaved rotary embeddings (Hugging Face's attention forward)."""

    def _build_attention_bridge(self) -> AttentionBridge:
        return _native_attention(self.cfg)


class InterleavedQKV(nn.Module):
    """A fused projection [q_h | k_h | v_h per head h] as three linear maps (`q_proj`, `k_proj`, `v_proj`)
    whose outputs are interleaved back into the fused layout: the same function, each part hookable."""

    def __init__(self, fused: nn.Linear, n_heads: int) -> None:
        super().__init__()
        d_in, n = fused.in_features, n_heads
        weight = fused.weight.detach().view(n, 3, -1, d_in)
        bias = None if fused.bias is None else fused.bias.detach().view(n, 3, -1)
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            part = nn.Linear(d_in, weight.shape[2] * n, bias=bias is not None)
            part.to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                part.weight.copy_(weight[:, i].reshape(-1, d_in))
                if bias is not None:
                    part.bias.copy_(bias[:, i].reshape(-1))
            part.requires_grad_(fused.weight.requires_grad)
            self.add_module(name, part)
        self.n_heads = n

    def forward(self, x: Tensor) -> Tensor:
        parts = [getattr(self, name)(x) for name in ("q_proj", "k_proj", "v_proj")]
        heads = [part.view(*part.shape[:-1], self.n_heads, -1) for part in parts]
        return torch.stack(heads, dim=-2).flatten(-3)


class PersimmonArchitectureAdapter(ArchitectureAdapter):
    """Persimmon: its fused q / k / v projection split (`InterleavedQKV`), Hugging Face's attention."""

    restructures_modules = True  # `prepare_model` changes modules: a plain rebuild needs it too

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        _layer_norm_defaults(self.cfg, "rotary")
        qkv = "query_key_value."
        self.component_mapping = {
            "embed": EmbeddingBridge(name="model.embed_tokens"),
            "rotary_emb": RotaryEmbeddingBridge(name="model.rotary_emb"),
            "blocks": BlockBridge(
                name="model.layers",
                submodules={
                    "ln1": _layer_norm("input_layernorm", self.cfg),
                    "ln2": _layer_norm("post_attention_layernorm", self.cfg),
                    "attn": _native_attention(
                        self.cfg, (qkv + "q_proj", qkv + "k_proj", qkv + "v_proj", "dense")
                    ),
                    "mlp": _plain_mlp(self.cfg, "mlp", "dense_h_to_4h", "dense_4h_to_h"),
                },
            ),
            "ln_final": _layer_norm("model.final_layernorm", self.cfg),
            "unembed": UnembeddingBridge(name="lm_head", config=self.cfg),
        }

    def prepare_model(self, hf_model: Any) -> None:
        super().prepare_model(hf_model)
        for layer in hf_model.model.layers:
            attn = layer.self_attn
            if isinstance(attn.query_key_value, nn.Linear):
                attn.query_key_value = InterleavedQKV(attn.query_key_value, attn.num_heads)


class BioGptArchitectureAdapter(ArchitectureAdapter):
    """BioGPT: OPT's pre-norm layout under BioGPT's names, Hugging Face's attention."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        _layer_norm_defaults(self.cfg, "standard")
        self.component_mapping = {
            "embed": EmbeddingBridge(name="biogpt.embed_tokens"),
            "pos_embed": PosEmbedBridge(name="biogpt.embed_positions"),
            "blocks": BlockBridge(
                name="biogpt.layers",
                hook_alias_overrides={"hook_mlp_out": "mlp.out.hook_out"},
                submodules={
                    "ln1": _layer_norm("self_attn_layer_norm", self.cfg),
                    "attn": _native_attention(self.cfg, ("q_proj", "k_proj", "v_proj", "out_proj")),
                    "ln2": _layer_norm("final_layer_norm", self.cfg),
                    "mlp": _plain_mlp(self.cfg, None, "fc1", "fc2"),
                },
            ),
            "ln_final": _layer_norm("biogpt.layer_norm", self.cfg),
            "unembed": UnembeddingBridge(name="output_projection"),
        }


class GraniteHybridArchitectureAdapter(GraniteMoeHybridArchitectureAdapter):
    """Granite-4 hybrid (IBM): TransformerLens 4.3's adapter, which maps a rotary-embedding component
    whenever its config lacks `position_embedding_type` (it always does), so a model without rotary
    embeddings (Granite-4.0-H: no position embeddings at all) fails to run. Here the component is mapped
    only where the Hugging Face model has one."""

    def prepare_model(self, hf_model: Any) -> None:
        super().prepare_model(hf_model)
        if getattr(getattr(hf_model, "model", None), "rotary_emb", None) is None and self.component_mapping:
            self.component_mapping.pop("rotary_emb", None)
            self.cfg.positional_embedding_type = "none"


ADAPTERS: dict[str, type[ArchitectureAdapter]] = {
    "HeliumForCausalLM": HeliumArchitectureAdapter,
    "PersimmonForCausalLM": PersimmonArchitectureAdapter,
    "BioGptForCausalLM": BioGptArchitectureAdapter,
    "GraniteMoeHybridForCausalLM": GraniteHybridArchitectureAdapter,
}


def register() -> None:
    """Make TransformerLens wrap the architectures of `ADAPTERS` (idempotent). TransformerLens 4.3 checks a
    config's architecture against its module-level table before it asks the factory, so both learn it."""
    for name, adapter in ADAPTERS.items():
        factory.ArchitectureAdapterFactory.register_adapter(name, adapter)
        factory.SUPPORTED_ARCHITECTURES[name] = adapter
