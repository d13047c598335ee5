"""Tiny random models and a tiny tokenizer, built offline and seeded, for tests and examples.

`tiny_llama()` (RMSNorm, rotary, grouped-query attention, gated MLP) and `tiny_gpt2()` (LayerNorm, learned
positions, joint qkv) have 2 layers and d_model 64. `tiny_tokenizer()` is a byte-level BPE trained in a few
milliseconds on a fixed corpus, so names come out as single tokens with a leading space, as in real models.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from circuits.models.hooked import HookedModel
from circuits.models.loading import load_model

NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Sarah", "David", "Laura"]
_CORPUS = [
    f"When {a} and {b} went to the store, {b} gave a drink to {a}. Then {a} said hello to {b}."
    for a in NAMES
    for b in NAMES
    if a != b
] + ["The keys to the cabinet are on the table. The key is here. Paris is the capital of France."]


@lru_cache(maxsize=1)
def _tokenizer_object() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with BOS/EOS/PAD; common names are single ' Name' tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object(),
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        name_or_path="circuits-tiny-tokenizer",
    )


def _seeded(build: Callable[[], PreTrainedModel], seed: int) -> PreTrainedModel:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build().eval()
    finally:
        torch.random.set_rng_state(state)


def tiny_llama_hf(seed: int = 0, n_layers: int = 2) -> PreTrainedModel:
    """Llama-style: RMSNorm, rotary, 4 query heads sharing 2 key/value heads, gated SiLU MLP."""
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    cfg._name_or_path = "tiny-llama"
    return _seeded(lambda: LlamaForCausalLM(cfg), seed)


def tiny_gpt2_hf(seed: int = 0, n_layers: int = 2, activation: str = "gelu_new") -> PreTrainedModel:
    """GPT-2-style: LayerNorm, learned positions, joint qkv projection, GELU MLP, biases. `activation`:
    GPT-2's tanh GELU as transformers writes it ("gelu_new", several elementwise ops) or as one torch op
    ("gelu_pytorch_tanh", the same function, rounded once in half precision)."""
    cfg = GPT2Config(
        activation_function=activation,
        vocab_size=len(tiny_tokenizer()),
        n_embd=64,
        n_layer=n_layers,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=1,
    )
    cfg._name_or_path = "tiny-gpt2"
    return _seeded(lambda: GPT2LMHeadModel(cfg), seed)


def tiny_llama(seed: int = 0, n_layers: int = 2, **kwargs: Any) -> HookedModel:
    """`tiny_llama_hf` loaded as a checked `HookedModel`."""
    return load_model(tiny_llama_hf(seed, n_layers), tiny_tokenizer(), **kwargs)


def tiny_gpt2(seed: int = 0, n_layers: int = 2, **kwargs: Any) -> HookedModel:
    """`tiny_gpt2_hf` loaded as a checked `HookedModel`."""
    return load_model(tiny_gpt2_hf(seed, n_layers), tiny_tokenizer(), **kwargs)
