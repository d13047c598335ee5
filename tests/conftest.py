import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from circuits.testing import tiny_gpt2, tiny_llama


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
