"""Run under torchrun by `tests/distributed/test_data_parallel.py`: rank 1 raises after the process
group is joined, while rank 0 ends normally and waits at the exit barrier."""

from __future__ import annotations

import torch

from circuits.distributed import rank, sum_tensor

sum_tensor(torch.ones(2), torch.device("cpu"))
if rank() == 1:
    raise ValueError("rank 1 fails on purpose")
