"""Multi-head latent attention: each head's q, k and v recomputed from the residual (the rotary embedding in
each of its three layouts) equal what the model computes, and sparse attention's prompt limit is enforced."""

from dataclasses import replace

import pytest
import torch

from circuits import load_model
from circuits.errors import UnsupportedModelError
from circuits.models import HookedModel
from circuits.models.hooked import QKV_LETTERS
from circuits.testing import tiny_tokenizer
from tests.architectures import ARCHITECTURES


def _latent_model(name: str, **options) -> HookedModel:
    arch = next(a for a in ARCHITECTURES if a.name == name)
    return load_model(replace(arch, options=arch.options | options).build(), tiny_tokenizer())


@pytest.mark.parametrize(
    "name, options",
    [
        ("deepseek_v2", {}),  # rotations as complex numbers
        ("deepseek_v3", {}),  # interleaved pairs
        ("glm4_moe_lite", {"rope_interleave": False}),  # halves (rotate_half)
        ("glm_moe_dsa", {}),  # interleaved pairs always, a sparse-attention indexer
    ],
    ids=["complex", "interleaved", "halves", "sparse"],
)
def test_heads_inputs_recomputed_from_the_residual_are_the_models(name, options):
    model = _latent_model(name, **options)
    spec = model.spec
    ids = torch.randint(3, 300, (2, 9))
    layer = spec.n_layers - 1
    names = [model.attn_norm_in_hook(layer), *(model.head_input_hook(layer, x) for x in QKV_LETTERS)]
    with torch.no_grad(), model.capture(names) as seen:
        model(ids)
    resid = seen[names[0]].unsqueeze(2).expand(-1, -1, spec.n_heads, -1)
    for letter, name in zip(QKV_LETTERS, names[1:], strict=True):
        width = model.qkv_width(layer, letter)
        assert seen[name].shape == (2, 9, spec.n_heads * width)  # shown position-major, as every head input
        ours = model.qkv_from_residual(layer, letter, resid)
        torch.testing.assert_close(ours.flatten(2), seen[name], rtol=1e-5, atol=1e-6)
    assert (model.qkv_width(layer, "q"), model.qkv_width(layer, "v")) == (16, 12)


def test_sparse_attention_refuses_prompts_longer_than_its_top_k():
    model = _latent_model("glm_moe_dsa", index_topk=20)
    assert model.longest_exact_prompt == 20
    model(torch.randint(3, 300, (1, 20)))
    with pytest.raises(UnsupportedModelError, match="top 20 keys"):
        model(torch.randint(3, 300, (1, 21)))
