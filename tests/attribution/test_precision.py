"""Half-precision models: scores are accumulated in float32 / float64 whatever the model's dtype, and they
agree with the float32 model's (Pearson over all edges)."""

import pytest
import torch

from circuits import Graph, attribute, load_model
from circuits.testing import tiny_gpt2_hf, tiny_llama_hf, tiny_tokenizer
from tests.pairs import make_pairs

# measured: llama bf16 0.99997-0.99998, fp16 0.999998+; gpt2 fp16 0.999994+, gpt2 bf16 0.9988-0.9992: the
# GPT-2-style tiny model's bf16 forward and backward themselves (8-bit mantissas through LayerNorm with
# biases) move its small random-weight gradients by that much; see docs/benchmarks.md
FLOOR = {("llama", torch.bfloat16): 0.999, ("llama", torch.float16): 0.999, ("gpt2", torch.float16): 0.999}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "clean-corrupted"])
def test_half_precision_scores_follow_float32(name, dtype, method):
    build = tiny_llama_hf if name == "llama" else tiny_gpt2_hf
    full, half = load_model(build(), tiny_tokenizer()), load_model(build(), tiny_tokenizer(), dtype=dtype)
    pairs = make_pairs(full)
    ours = attribute(half, Graph.from_model(half), pairs, method=method, quiet=True).edge_scores
    want = attribute(full, Graph.from_model(full), pairs, method=method, quiet=True).edge_scores
    assert ours is not None and want is not None and ours.dtype == torch.float32
    valid = Graph.from_model(full).valid
    pearson = float(torch.corrcoef(torch.stack([ours[valid].double(), want[valid].double()]))[0, 1])
    assert pearson >= FLOOR.get((name, dtype), 0.998), pearson
