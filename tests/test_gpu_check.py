"""The GPU check (scripts/gpu_check.sh) and its bundle (scripts/device_bundle.sh), run here on the CPU with
small shapes so that neither rots between the rare sessions that are lent a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check import Step, markdown  # noqa: E402

pytestmark = pytest.mark.slow


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    command = ["bash", "scripts/gpu_check.sh", "--device", "cpu", "--shape", "small", "--tests", "quick"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {step["name"]: step for step in found["steps"]}
    assert list(steps) == ["tests", "benchmark-gpt2-small-random", "benchmark-llama-3.1-8b-random"]
    assert steps["tests"]["results"] == {"passed": 1}
    for name in ("gpt2-small-random", "llama-3.1-8b-random"):
        rows = steps[f"benchmark-{name}"]["results"]["rows"]
        methods = [row["method"] for row in rows]
        for method in ("eap", "eap-ig-inputs", "clean-corrupted", "exact (node level)"):
            assert method in methods
        assert any(m.startswith("evaluate_many, 10 circuits") for m in methods)
        assert all(row["seconds"] > 0 and row["model"] == name for row in rows)
        assert next(r for r in rows if r["method"] == "exact (node level)")["pairs"] == 4  # the subset
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| llama-3.1-8b-random | eap-ig-inputs | 8 |" in table
    assert len(list(tmp_path.iterdir())) <= 8  # the device tool brings back at most 8 files


def test_the_side_by_side_table_pairs_each_method_with_the_reference():
    def row(method: str, seconds: float) -> dict:
        return dict(
            model="m", method=method, seconds=seconds, pairs=4, seconds_per_pair=seconds / 4, limit=""
        )

    ours = Step("benchmark-m", [], results={"rows": [row("eap", 2.0), row("exact (node level)", 9.0)]})
    theirs = Step("reference-m", [], results={"rows": [row("EAP-IG reference: eap", 5.0)]})
    table = markdown({"device": "test"}, [ours, theirs])
    assert "| m | eap | 2.00 s | 5.00 s | 2.50x |" in table
    assert table.count("x |") == 1  # exact has no reference row


def test_the_bundle_builds_within_the_device_tools_limit(tmp_path):
    """Downloads from the package registry (as a developer's machine and CI can)."""
    env = dict(os.environ, BUNDLE=str(tmp_path / "bundle"))
    done = subprocess.run(
        ["bash", "scripts/device_bundle.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheels = sorted(p.name.split("-")[0] for p in (tmp_path / "bundle").rglob("*.whl"))
    assert wheels == sorted(
        [
            "circuits",
            "datasets",
            "dill",
            "gguf",
            "multiprocess",
            "transformer_lens",
            "transformer_lens",
            "better_abc",
        ]
    )
    size = sum(p.stat().st_size for p in (tmp_path / "bundle").rglob("*") if p.is_file())
    assert size < 56 * 2**20
    assert "command: bash scripts/gpu_check.sh --device cuda" in done.stdout
