"""Published model shapes with random weights, and random token pairs, for the benchmarks.

Only torch and transformers are imported here, so that the EAP-IG reference run
(scripts/eap_ig_reference.py, which needs TransformerLens 3 and not this package) builds the same shapes and
the same pairs as scripts/benchmark.py.
"""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Published shapes (config.json of each model); `--shape small` keeps the architecture and shrinks the sizes.
SHAPES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict]] = {
    "gpt2-small-random": (GPT2Config, GPT2LMHeadModel, {}),  # 12 layers, 12 heads, d_model 768
    "qwen2.5-0.5b-random": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
        ),
    ),
    "llama-3.1-8b-random": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            rope_theta=500000.0,
        ),
    ),
}
SMALL = {  # the sizes of `--shape small`, by the config classes' field names
    GPT2Config: dict(n_layer=2, n_head=4, n_embd=64),
    Qwen2Config: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    LlamaConfig: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
PAIR_LENGTH = 16  # tokens per prompt of the random pairs


def random_config(name: str, shape: str = "published") -> PretrainedConfig:
    """The Hugging Face config of shape `name` ("published" sizes or "small" ones)."""
    config_class, _, sizes = SHAPES[name]
    if shape == "small":
        sizes = (
            sizes
            | SMALL[config_class]
            | ({"num_key_value_heads": 2} if "num_key_value_heads" in sizes else {})
        )
    return config_class(**sizes)


def random_hf(name: str, shape: str = "published", device: str = "cpu") -> PreTrainedModel:
    """A Hugging Face model of shape `name` with random weights (seed 0), drawn on `device` (an 8B model is
    not built on the host first)."""
    _, model_class, _ = SHAPES[name]
    torch.manual_seed(0)
    with torch.device(device):
        return model_class(random_config(name, shape)).eval()


def random_token_pairs(
    d_vocab: int, n: int, length: int = PAIR_LENGTH
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` random prompts of `length` tokens, their corrupted copies (the middle token redrawn), and random
    answer / wrong-answer tokens: (clean, corrupted) [n, length], (answer, wrong) [n] (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, d_vocab, (n, length), generator=gen)
    corrupted = clean.clone()
    corrupted[:, length // 2] = torch.randint(0, d_vocab, (n,), generator=gen)
    answer = torch.randint(0, d_vocab, (n,), generator=gen)
    return clean, corrupted, answer, (answer + 1) % d_vocab
