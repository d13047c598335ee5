"""Multi-head latent attention (DeepSeek-V2 / V3, GLM-4.7-Flash, Youtu): each head's q, k and v as a
function of the attention norm's output, the residual seen through low-rank projections.

MLA (DeepSeek-AI, "DeepSeek-V2", arXiv 2405.04434) computes, from the normed residual x at one position:

    q      = W_qB N_q(W_qA x)            (or W_Q x without a query latent), split per head into a part
                                         without position (nope) and a rotary part (rope)
    c, r   = W_kvA x                     a key/value latent c and ONE rotary key part r for all heads
    k_h, v_h = slice_h W_kvB N_kv(c)     per head: the key's nope part and the value
    key_h  = [k_h, RoPE(r)]              the shared rotary part repeated into every head's key

Head h's key input is therefore a function of the residual alone (its own slice of W_kvB and the shared
rotary part), patchable per head by recomputing all of it from a patched residual and keeping head h, and
differentiable by autograd. TransformerLens hooks each head's final q, k and v only after the rotary
embedding (`attn.hook_q`, `hook_k`, `hook_v`, [batch, heads, pos, width]), so that is where they are read
and written, and `__call__` recomputes the rotation as the bridge applies it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

Letter = Literal["q", "k", "v"]


def is_latent(attention: nn.Module | None) -> bool:
    """True for a Hugging Face attention module of multi-head latent attention."""
    return attention is not None and hasattr(attention, "kv_a_proj_with_mqa")


def has_indexer(attention: nn.Module) -> bool:
    """DeepSeek sparse attention (GLM-MoE-DSA): an indexer picks the keys each query may attend to."""
    return getattr(attention, "indexer", None) is not None


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LatentAttention:
    """Per-head q / k / v of one MLA layer from copies of the attention norm's output.

    Args:
        attention: the Hugging Face attention module (`q_proj` or `q_a_proj`/`q_a_layernorm`/`q_b_proj`,
            `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`).
        rotary: the model's rotary embedding module, `rotary(x, position_ids)` giving (cos, sin) or a
            complex tensor of rotations (DeepSeek-V2's `freqs_cis`).
    """

    def __init__(self, attention: nn.Module, rotary: nn.Module) -> None:
        self.attention = attention
        self.rotary = rotary
        a: Any = attention
        self.nope, self.rope, self.v_width = (
            int(a.qk_nope_head_dim),
            int(a.qk_rope_head_dim),
            int(a.v_head_dim),
        )
        self.kv_rank = int(a.kv_lora_rank)
        self.n_heads = int(a.kv_b_proj.out_features) // (self.nope + self.v_width)
        # pairs rotated in place where the config says so (DeepSeek-V3), and always with a sparse-attention
        # indexer (GLM-MoE-DSA); the load-time additivity check verifies the choice against the bridge
        self.interleave = bool(getattr(a.config, "rope_interleave", False)) or has_indexer(attention)

    @property
    def longest_exact_prompt(self) -> int | None:
        """With a sparse-attention indexer: the most positions for which every query attends to all keys
        before it (its top-k), so that the graph (which has no node for the indexer's choice, a discrete
        function of the residual) is exact; None without one."""
        indexer: Any = getattr(self.attention, "indexer", None)
        return None if indexer is None else int(indexer.index_topk)

    def width(self, letter: Letter) -> int:
        """Values per head: nope + rope for q and k, the value width for v."""
        return self.v_width if letter == "v" else self.nope + self.rope

    def __call__(self, letter: Letter, x: Tensor) -> Tensor:
        """Head h's q (k, v) from its own copy of the normed residual: [b, P, n, width] from x
        [b, P, n, d_model] (n = n_heads, copy h for head h; positions 0..P-1, as the model numbers them)."""
        m = self._module
        if letter == "q":
            if getattr(self.attention, "q_lora_rank", None) is None:
                q = self._own_head(m("q_proj"), x)
            else:
                q = self._own_head(m("q_b_proj"), m("q_a_layernorm")(m("q_a_proj")(x)))
            return torch.cat((q[..., : self.nope], self._rotate(q[..., self.nope :])), dim=-1)
        c, r = m("kv_a_proj_with_mqa")(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self._own_head(m("kv_b_proj"), m("kv_a_layernorm")(c))
        if letter == "v":
            return kv[..., self.nope :]
        return torch.cat((kv[..., : self.nope], self._rotate(r)), dim=-1)

    def _module(self, name: str) -> nn.Module:
        """The attention's submodule `name` as Hugging Face wrote it: the bridge wraps each in a component
        that fires hooks, which a recomputation must not."""
        module = getattr(self.attention, name)
        return getattr(module, "_original_component", module)  # type: ignore[no-any-return]

    def _own_head(self, up: nn.Module, x: Tensor) -> Tensor:
        """Head h's slice of the up-projection `up` applied to copy h alone: [b, P, n, width] from x
        [b, P, n, d_in] (one slice matmul per head, not every head's output for every copy)."""
        weight = up.weight.unflatten(0, (self.n_heads, -1))  # type: ignore[operator]  # [n, width, d_in]
        out = torch.einsum("bpni,nwi->bpnw", x, weight.to(x.dtype))
        bias = getattr(up, "bias", None)
        return out if bias is None else out + bias.unflatten(0, (self.n_heads, -1)).to(out.dtype)

    def _rotate(self, x: Tensor) -> Tensor:
        """The rotary embedding of [b, P, n, rope] at positions 0..P-1, as the bridge applies it."""
        positions = torch.arange(x.shape[1], device=x.device)[None]
        emb = self.rotary(x, positions)
        if isinstance(emb, Tensor) and emb.is_complex():  # DeepSeek-V2: consecutive pairs as complex numbers
            pairs = x.float().unflatten(-1, (-1, 2))
            turned = torch.complex(pairs[..., 0], pairs[..., 1]) * emb[:, :, None].to(x.device)
            return torch.view_as_real(turned).flatten(-2).type_as(x)
        cos, sin = (t[:, :, None].to(x.dtype) for t in emb)  # [1, P, 1, rope]
        if self.interleave:  # pairs (x0, x1), (x2, x3), ... rotated, written as all firsts, then all seconds
            cos, sin = cos[..., : self.rope // 2], sin[..., : self.rope // 2]
            first, second = x[..., 0::2], x[..., 1::2]
            return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return x * cos + _rotate_half(x) * sin
