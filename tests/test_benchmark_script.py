"""scripts/benchmark.py's device / dtype / model-shape rows, on the CPU with small shapes (the GPU run uses
the same code with --device cuda and the published shapes)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_rows_for_the_scale_models():
    command = [
        sys.executable,
        "scripts/benchmark.py",
        "--shape",
        "small",
        "--models",
        "llama-3.1-8b-random",
        "qwen2.5-0.5b-random",
        "--n",
        "4",
        "--batch-size",
        "2",
        "--repeats",
        "1",
        "--sections",
        "edges",
        "--methods",
        "eap",
        "eap-ig-inputs",
        "exact",
        "--dtype",
        "bfloat16",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [
        line for line in done.stdout.splitlines() if line.startswith("| llama") or line.startswith("| qwen")
    ]
    for model in ("llama-3.1-8b-random", "qwen2.5-0.5b-random"):
        labels = [row.split(" | ")[1] for row in rows if row.startswith(f"| {model} ")]
        assert labels[:2] == ["plain forward", "plain forward+backward"], labels
        labels = labels[2:]
        assert labels[:3] == ["eap", "eap-ig-inputs", "exact (node level)"], labels
        assert any(label.startswith("evaluate_many, 10 circuits") for label in labels)
    assert "bfloat16" in done.stdout
