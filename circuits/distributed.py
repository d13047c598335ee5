"""Data parallelism over `torch.distributed`: scores, metrics and IG totals are sums over examples, so
each process can take a shard of the prompt pairs, run the ordinary engine on it, and all-reduce the sums.

Launched by `torchrun` (which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...), the first call that
needs it joins the process group from those variables (gloo on CPU, nccl on CUDA, bound to this process's
GPU); a process group the user initialised is used as it is. Under torchrun a CUDA device without an
index means this process's own GPU, cuda:LOCAL_RANK (`process_device`), as NCCL needs one GPU per
process. Without torchrun every function here is the identity: one process, the whole data. Shards are
contiguous blocks in global rank order (RANK, across machines), so a gather in rank order restores the
order of the pairs, and sums are reduced in float64, so the result does not depend on the number of
processes beyond float64 rounding.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from circuits.errors import InputError


def world_size() -> int:
    """Processes taking part: torchrun's WORLD_SIZE, or 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True in the process that writes files, prints and shows progress bars (rank 0)."""
    return rank() == 0


def local_rank() -> int:
    """This process's index among the processes of its machine: torchrun's LOCAL_RANK, or 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this machine: torchrun's LOCAL_WORLD_SIZE, or 1."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def parse_device(device: str | torch.device) -> torch.device:
    """`device` as a `torch.device`, or `InputError` for a name torch does not know ("gpu")."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(
            f"unknown device {device!r}; give cpu, cuda, cuda:1, mps, ... (a torch.device name)"
        ) from None


def check_available(device: str | torch.device) -> torch.device:
    """`device` parsed, or `InputError` when this machine lacks it (CUDA, that GPU index, Apple's MPS)."""
    device = parse_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU: use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(
            f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' asked for, but this machine has no Apple GPU: use cpu")
    return device


def process_device(device: str | torch.device) -> torch.device:
    """The device this process computes on: under torchrun (WORLD_SIZE > 1) "cuda" without an index is
    this process's GPU, cuda:LOCAL_RANK; any other device is returned as given.

    Raises `InputError` for a name torch does not know ("gpu") and when torchrun started more processes on
    this machine than it has GPUs."""
    device = parse_device(device)
    if device.type != "cuda" or device.index is not None or world_size() == 1:
        return device
    index = local_rank()
    available = torch.cuda.device_count()
    if index >= available:
        raise InputError(
            f"process {index} of this machine (LOCAL_RANK) has no GPU of its own: the machine has "
            f"{available}; start at most {available} processes per machine (torchrun --nproc-per-node)"
        )
    return torch.device("cuda", index)


def _join(device: torch.device) -> None:
    """Join torchrun's process group the first time one is needed (nccl bound to this process's GPU)."""
    if dist.is_initialized():
        return
    if not dist.is_available():
        raise InputError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        device = process_device(device)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(_leave)


def _leave() -> None:
    """Leave the process group this module joined, at interpreter exit. Left to the interpreter's own
    teardown, gloo's connection threads are destroyed while still joinable, which aborts the process
    ("terminate called without an active exception") in about one exit in six. After a normal exit a
    barrier first keeps a rank from closing its connections while another still uses them; after an
    uncaught exception there is no barrier, since the other ranks may never reach it."""
    if not dist.is_initialized():
        return
    if getattr(sys, "last_value", None) is None:
        dist.barrier()
    dist.destroy_process_group()


def shard_range(n: int, device: torch.device, what: str = "pairs") -> range:
    """This process's contiguous block of range(n) (n `what`): sizes differ by at most one, earlier ranks
    larger."""
    size = world_size()
    if size == 1:
        return range(n)
    _join(device)
    if n < size:
        raise InputError(f"{n} {what} cannot be shared by {size} processes: give at least one to each")
    base, extra = divmod(n, size)
    r = rank()
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def process_chunks(
    n: int, size: int, device: torch.device, *, desc: str, unit: str = "pair", quiet: bool = False
) -> Iterator[range]:
    """This process's share of range(n) (all of it, unless under torchrun; `shard_range`) in consecutive
    chunks of at most `size`, with a progress bar in `unit`s on the main process (none when `quiet`).
    Every loop over a process's data goes through here."""
    mine = shard_range(n, device, f"{unit}s")
    with tqdm(total=len(mine), desc=desc, unit=unit, disable=quiet or not is_main()) as bar:
        for start in range(mine.start, mine.stop, size):
            chunk = range(start, min(start + size, mine.stop))
            yield chunk
            bar.update(len(chunk))


def _collective_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_tensor(x: Tensor, device: torch.device) -> Tensor:
    """The sum of `x` over processes, in float64 (the input's device; `x` itself is not changed)."""
    if world_size() == 1:
        return x.double()
    _join(device)
    total = x.detach().double().to(_collective_device(device)).clone()
    dist.all_reduce(total)
    return total.to(x.device)


def sum_floats(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value summed over processes (every process must pass the same keys)."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    total = sum_tensor(torch.tensor([values[k] for k in keys], dtype=torch.float64), device)
    return {k: float(v) for k, v in zip(keys, total.tolist())}


def gather_rows(x: Tensor, device: torch.device) -> Tensor:
    """The processes' tensors concatenated along dim 0 in rank order (shapes may differ in dim 0)."""
    if world_size() == 1:
        return x
    _join(device)
    parts: list[Tensor | None] = [None] * world_size()
    dist.all_gather_object(parts, x.detach().cpu())
    return torch.cat([p for p in parts if p is not None]).to(x.device)
