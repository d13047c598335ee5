"""Where the shared public data sets live: $CIRCUITS_DATA, else `shared/data` next to this checkout."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path of a file under the shared data folder; a clear error if the folder is missing."""
    root = Path(os.environ.get("CIRCUITS_DATA", DEFAULT))
    if not root.exists():
        raise FileNotFoundError(
            f"shared data folder {root} not found; set CIRCUITS_DATA to the folder that holds ircan/ "
            "and truthfulqa/"
        )
    return root.joinpath(*parts)
