"""Execute the notebooks top to bottom and save them with their outputs (figures included).

python scripts/run_notebooks.py                # all notebooks in notebooks/
python scripts/run_notebooks.py notebooks/01_ioi_circuit.ipynb
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(path: Path, timeout: int = 900) -> nbformat.NotebookNode:
    """Run a notebook in its own folder; raises on the first failing cell."""
    book = nbformat.read(path, as_version=4)
    NotebookClient(
        book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    return book


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="*", type=Path)
    args = parser.parse_args()
    for path in args.paths or sorted(NOTEBOOKS.glob("*.ipynb")):
        start = time.perf_counter()
        nbformat.write(execute(path), path)
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
