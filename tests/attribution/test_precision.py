"""Half-precision models: scores are accumulated in float32 / float64 whatever the model's dtype, and they
agree with the float32 model's (Pearson over all edges)."""

import pytest
import torch

from circuits import Graph, attribute, load_model
from circuits.testing import tiny_gpt2_hf, tiny_llama_hf, tiny_tokenizer
from tests.pairs import make_pairs

# measured: llama bf16 0.99997-0.99998, fp16 0.999998+; gpt2 fp16 0.999994+; gpt2 bf16 0.9988-0.9992 with
# transformers' "gelu_new" (tanh GELU as five elementwise ops, each rounded to bfloat16: the model's own
# bf16 forward, not the engine's sums, moves the scores) and 0.9995 with the same function as one torch op
# ("gelu_pytorch_tanh"); see docs/benchmarks.md
BUILDERS = {
    "llama": tiny_llama_hf,
    "gpt2": tiny_gpt2_hf,
    "gpt2-torch-gelu": lambda: tiny_gpt2_hf(activation="gelu_pytorch_tanh"),
}
FLOOR = {("gpt2", torch.bfloat16): 0.998}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "clean-corrupted"])
def test_half_precision_scores_follow_float32(name, dtype, method):
    build = BUILDERS[name]
    full, half = load_model(build(), tiny_tokenizer()), load_model(build(), tiny_tokenizer(), dtype=dtype)
    pairs = make_pairs(full)
    ours = attribute(half, Graph.from_model(half), pairs, method=method, quiet=True).edge_scores
    want = attribute(full, Graph.from_model(full), pairs, method=method, quiet=True).edge_scores
    assert ours is not None and want is not None and ours.dtype == torch.float32
    valid = Graph.from_model(full).valid
    pearson = float(torch.corrcoef(torch.stack([ours[valid].double(), want[valid].double()]))[0, 1])
    assert pearson >= FLOOR.get((name, dtype), 0.999), pearson
