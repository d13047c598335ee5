"""The IOI reproduction script on GPT-2 small's architecture with random weights (offline)."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs SmolLM2, the notebooks or many model builds; `make test` runs it

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_ioi.py"


def test_gpt2_small_path_runs_and_reports_head_classes(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("reproduce_ioi", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "ioi"
    module.main(
        [
            "--model",
            "random-gpt2-small",
            "--n",
            "4",
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--no-curve",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "Overlap of the top heads with Wang et al. (2022) head classes" in printed
    assert "name mover" in printed and "faithfulness" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["top_heads"]) == 12 and set(summary["head_classes_wang_2022"]) >= {
        "name mover",
        "induction",
    }
    assert (out / "circuit.svg").exists() and (out / "scores.pt").exists()
