"""Data parallelism (circuits.distributed): two processes under torchrun (gloo, CPU) give the results of
one process, for attribute (eap, eap-ig-inputs), evaluate_many, neuron IG and the CLI's discover; on one
machine, and as two machines of one process each (two torchrun launchers on localhost, so that RANK and
LOCAL_RANK differ)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuits.cli import main
from tests.distributed.worker import results

pytestmark = pytest.mark.slow  # starts two torchrun processes per test

ROOT = Path(__file__).resolve().parents[2]


ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _two_machines(*args: str, timeout: int = 600) -> None:
    """`args` under two torchrun launchers, as machine 0 and machine 1 of one process each."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
    launchers = [
        subprocess.Popen(
            [*TORCHRUN, *common, "--master-port", str(port), "--node-rank", str(node), *args],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for node, launcher in enumerate(launchers):
        _, err = launcher.communicate(timeout=timeout)
        assert launcher.returncode == 0, f"machine {node}: {err[-4000:]}"


def _torchrun_ok(*args: str) -> None:
    done = _torchrun(*args)
    assert done.returncode == 0, done.stderr[-4000:]


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    scale = float(theirs.abs().max()) or 1.0
    err = float((ours.double() - theirs.double()).abs().max())
    assert err <= 1e-6 * scale, f"{what}: max difference {err:.3g} of {scale:.3g}"


@pytest.fixture(scope="module")
def one_process() -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): the same float reductions in each matmul
    try:
        return results()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("machines", [1, 2])
def test_two_processes_give_the_single_process_results(tmp_path, one_process, machines):
    launch = _torchrun_ok if machines == 1 else _two_machines
    launch("-m", "tests.distributed.worker", str(tmp_path / "two.pt"))
    two, one = torch.load(tmp_path / "two.pt"), dict(one_process)
    assert int(two.pop("world_size")) == 2 and int(one.pop("world_size")) == 1
    assert set(two) == set(one)
    for key, value in one.items():
        assert two[key].shape == value.shape, key
        _close(two[key], value, key)


def test_cli_discover_under_torchrun_writes_the_single_process_files(tmp_path):
    # --n-pairs: torchrun's own parser would take --n for an abbreviation of --nnodes / --nproc-per-node
    args = ["discover", "--task", "ioi", "--model", "tiny-llama", "--n-pairs", "16", "--batch-size", "4"]
    _torchrun_ok("-m", "circuits", *args, "--out", str(tmp_path / "two"))
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = (torch.load(tmp_path / name / "scores.pt") for name in ("one", "two"))
    for key in ("edge_scores", "node_scores"):
        _close(two[key], one[key], key)
    circuit_one, circuit_two = (
        json.loads((tmp_path / n / "circuit.json").read_text()) for n in ("one", "two")
    )
    assert {e for e, v in circuit_one["edges"].items() if v["in_graph"]} == {
        e for e, v in circuit_two["edges"].items() if v["in_graph"]
    }
    summary_one, summary_two = (
        json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two")
    )
    for summary in (summary_one, summary_two):
        summary.pop("seconds")
    assert summary_one.keys() == summary_two.keys()
    for key in ("faithfulness", "CPR", "CMD", "metric_circuit", "metric_full", "metric_empty", "n_pairs"):
        assert summary_two[key] == pytest.approx(summary_one[key], rel=1e-6, abs=1e-9), key


def test_a_failing_process_ends_the_run_with_its_error_not_a_hang():
    # the exit barrier is skipped after an uncaught exception, so rank 0 (at the barrier) is released
    done = _torchrun("-m", "tests.distributed.failing_worker", timeout=120)
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stdout + done.stderr
