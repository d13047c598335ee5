"""An independent, slow forward pass of a Hugging Face Llama model with split per-destination inputs.

Written from the weights alone (no hooks, no bridge), so tests can compare the engine with brute force:
every destination's input is the explicit sum of its upstream sources' outputs plus an optional patch.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def rms_norm(module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in the input's own precision (HF's version computes in float32)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon) * module.weight


def reference_llama(hf, ids: torch.Tensor, patches: dict[str, torch.Tensor] | None = None):
    """Returns (logits [b, P, V], source outputs {name: [b, P, d]}).

    patches: destination name (EAP-IG style: 'a1.h2<q>', 'm0', 'logits') -> tensor added to its input.
    """
    patches = patches or {}
    cfg = hf.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d_head = cfg.hidden_size // n_heads
    b, p = ids.shape
    sources: dict[str, torch.Tensor] = {"input": hf.model.embed_tokens(ids)}

    def dst_input(name: str) -> torch.Tensor:
        x = torch.stack(list(sources.values())).sum(0)
        return x + patches[name] if name in patches else x

    position_ids = torch.arange(p)[None].expand(b, p)
    cos, sin = hf.model.rotary_emb(sources["input"], position_ids)
    causal = torch.full((p, p), float("-inf")).triu(1)
    for layer_index, layer in enumerate(hf.model.layers):
        attn = layer.self_attn
        wq = attn.q_proj.weight.reshape(n_heads, d_head, -1)
        wk = attn.k_proj.weight.reshape(n_kv, d_head, -1)
        wv = attn.v_proj.weight.reshape(n_kv, d_head, -1)
        wo = attn.o_proj.weight.T.reshape(n_heads, d_head, -1)

        def norm(x, module=layer.input_layernorm):
            return rms_norm(module, x)

        q = torch.stack([norm(dst_input(f"a{layer_index}.h{h}<q>")) @ wq[h].T for h in range(n_heads)], 1)
        k = torch.stack([norm(dst_input(f"a{layer_index}.kv{g}<k>")) @ wk[g].T for g in range(n_kv)], 1)
        v = torch.stack([norm(dst_input(f"a{layer_index}.kv{g}<v>")) @ wv[g].T for g in range(n_kv)], 1)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        group = n_heads // n_kv
        new = {}
        for h in range(n_heads):
            scores = q[:, h] @ k[:, h // group].transpose(-1, -2) / d_head**0.5 + causal
            z = scores.softmax(-1) @ v[:, h // group]
            new[f"a{layer_index}.h{h}"] = z @ wo[h]
        sources.update(new)
        mlp_in = rms_norm(layer.post_attention_layernorm, dst_input(f"m{layer_index}"))
        sources[f"m{layer_index}"] = layer.mlp(mlp_in)
    logits = hf.lm_head(rms_norm(hf.model.norm, dst_input("logits")))
    return logits, sources
