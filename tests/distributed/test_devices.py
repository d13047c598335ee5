"""Which device each process computes on (circuits.distributed.process_device): under torchrun "cuda" is
the process's own GPU, cuda:LOCAL_RANK, as NCCL needs one GPU per process. The torchrun environment is
simulated here (no process group is joined), and so is the GPU count: the logic, not NCCL, is tested."""

import pytest
import torch

from circuits import load_model
from circuits.distributed import process_device
from circuits.errors import InputError
from circuits.testing import tiny_llama_hf, tiny_tokenizer


def _torchrun(monkeypatch, local_rank: int, gpus: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")  # e.g. 2 machines of 2 processes: RANK != LOCAL_RANK
    monkeypatch.setenv("RANK", str(2 + local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


def test_one_process_keeps_the_device_it_is_given(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for device in ("cpu", "cuda", "cuda:1"):
        assert process_device(device) == torch.device(device)


def test_under_torchrun_cuda_is_the_process_own_gpu(monkeypatch):
    _torchrun(monkeypatch, local_rank=1, gpus=2)
    assert process_device("cuda") == torch.device("cuda", 1)
    assert process_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert process_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is the user's choice
    assert process_device("cpu") == torch.device("cpu")


def test_more_processes_than_gpus_is_refused_with_the_counts(monkeypatch):
    _torchrun(monkeypatch, local_rank=1, gpus=1)
    with pytest.raises(InputError, match="has 1; start at most 1 processes per machine"):
        process_device("cuda")


def test_a_device_and_a_device_map_together_are_refused():
    with pytest.raises(InputError, match="not both"):
        load_model(tiny_llama_hf(), tiny_tokenizer(), device="cpu", device_map="auto")


def test_a_named_device_map_for_several_processes_of_one_machine_is_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(InputError, match="spread every process over all of its GPUs"):
        load_model(tiny_llama_hf(), tiny_tokenizer(), device_map="auto")
