import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from circuits.testing import tiny_gpt2, tiny_llama


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that runs the embedded SmolLM2 model is `slow` (excluded by `make test-fast`)."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def smollm2():
    from circuits import load_model

    return load_model("smollm2-135m")


LAYOUTS = {
    "gemma2": "post-norm",
    "phi": "shared norm",
    "granite": "residual multiplier",
    "opt": "flattened MLP",
    "olmo2": "q/k norm over all heads (grouped-query)",
    "bamba": "hybrid: a state-space mixer layer, then an attention layer",
    "youtu": "multi-head latent attention (q/k/v through latents and the rotary embedding)",
    "laguna": "per-head output gates from a projection of their own (grouped-query)",
    "gemma4_text (learned layer scalars, no per-layer inputs)": "layers rescaling the residual stream",
    "falcon_h1": "a Mamba mixer beside the heads in every layer, multipliers folded",
}


@pytest.fixture(scope="session", params=["llama", "gpt2", *LAYOUTS])
def layout(request):
    """A tiny model of each block layout the engine handles differently (see tests/architectures.py)."""
    if request.param in ("llama", "gpt2"):
        return request.getfixturevalue(request.param)
    from circuits import load_model
    from circuits.testing import tiny_tokenizer
    from tests.architectures import ARCHITECTURES

    arch = next(a for a in ARCHITECTURES if a.name == request.param)
    return load_model(arch.build(), tiny_tokenizer())
