"""The public API: one import for a notebook, the README's quick start run as written, and `import
circuits.cli` loading no more than a command needs."""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import circuits

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _quick_start() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_every_public_name_resolves():
    for name in circuits.__all__:
        assert getattr(circuits, name) is not None, name
    assert circuits.ScoringOptions is circuits.attribution.ScoringOptions
    importlib.import_module("circuits.baseline")  # a submodule of the function's name must not shadow it
    assert callable(circuits.baseline) and circuits.make_task.__module__ == "circuits.task"
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        circuits.nothing_here  # noqa: B018


def test_the_cli_does_not_load_plots_pages_neurons_or_steering():
    heavy = [
        "matplotlib",
        "circuits.pictures.drawing",
        "circuits.pictures.viewer",
        "circuits.pipeline",
        "circuits.neurons",
    ]
    heavy += ["circuits.steering"]
    code = f"import sys, circuits.cli; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_readme_is_a_guide_and_its_quick_start_imports_from_circuits_alone():
    assert len(README.read_bytes()) <= 12 * 1024
    imports = [n for n in ast.walk(ast.parse(_quick_start())) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert imports and all(isinstance(n, ast.ImportFrom) and n.module == "circuits" for n in imports)
    for link in re.findall(r"\]\(([^)#]+)\)", README.read_text()):
        assert (ROOT / link).exists(), link


@pytest.mark.slow
def test_the_readme_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():  # MIB's numbers on MIB's graph: nothing to warn about but IG's steps
        warnings.filterwarnings("error", message="MIB's protocol")
        exec(compile(_quick_start(), "README.md quick start", "exec"), {})
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "CPR" in printed
    assert (tmp_path / "circuit.svg").exists() and (tmp_path / "circuit.json").exists()
    edges = json.loads((tmp_path / "circuit.json").read_text())["edges"]
    assert "input->a0.h8<k>" in edges  # EAP-IG's names: the file reads in EAP-IG as it is
