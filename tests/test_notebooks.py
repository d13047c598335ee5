"""The notebooks run top to bottom on the embedded model (a copy is executed; the committed files stay)."""

import importlib.util
from pathlib import Path

import pytest
from circuits_tasks.paths import DEFAULT

pytestmark = pytest.mark.slow  # runs SmolLM2, the notebooks or many model builds; `make test` runs it

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_notebooks)

NEEDS_DATA = {"02_context_neurons", "03_steering"}


@pytest.mark.parametrize("name", ["01_ioi_circuit", "02_context_neurons", "03_steering", "04_positions"])
def test_notebook_runs(name):
    if name in NEEDS_DATA and not DEFAULT.exists():
        pytest.skip(f"shared data folder {DEFAULT} is not next to this checkout")
    book = run_notebooks.execute(ROOT / "notebooks" / f"{name}.ipynb")
    errors = [
        o
        for c in book.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert not errors
