"""Output folders that are never left half-written: check before the work, swap in whole after it.

A run writes into a fresh hidden folder beside its target and, only when every file is written, the
folder takes the target's place. An interrupted or failed run leaves the target exactly as it was; a
finished one never leaves its files next to an earlier run's. Files in the target that the run does not
own (anything not in `owned`) are moved into the new folder, so nothing of the user's is lost.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from circuits.errors import InputError


def check_writable(out: Path) -> None:
    """Raise `InputError` now, before any work, if the folder `out` cannot be created or written, or is
    the current folder or one above it (a run replaces its folder whole)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    target, here = Path(out).resolve(), Path.cwd().resolve()
    if target == here or target in here.parents:
        raise InputError(
            f"--out {out}: is the current folder{' or above it' if target != here else ''}; a run replaces "
            "its output folder whole, so give a folder of its own (--out results)"
        )
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: cannot write in {existing} (permission denied or not a folder)")


@contextmanager
def replacing_folder(out: Path, owned: Iterable[str]) -> Iterator[Path]:
    """Yield an empty folder to write into; on success it becomes `out` (see the module docstring).

    Args:
        owned: names of the files a run writes; earlier copies of them are dropped, everything else in
            `out` is kept.
    """
    check_writable(out)
    out = Path(out).resolve()  # a symbolic link is followed: the folder it points to is replaced
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _swap_in(staging, out, set(owned))
    except OSError as err:
        raise InputError(
            f"--out {out}: the run finished but its folder could not take the place of {out} ({err}); "
            f"the results are in {staging}"
        ) from err


def _swap_in(staging: Path, out: Path, owned: set[str]) -> None:
    """Make `staging` the folder `out`, keeping `out`'s mode and the files of it that a run does not own."""
    umask = os.umask(0)
    os.umask(umask)
    mode = out.stat().st_mode & 0o7777 if out.exists() else 0o777 & ~umask
    os.chmod(staging, mode)
    if not out.exists():
        os.replace(staging, out)
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.previous-", dir=out.parent))
    os.replace(out, previous / "run")
    os.replace(staging, out)
    for item in (previous / "run").iterdir():
        if item.name not in owned and not (out / item.name).exists():
            os.replace(item, out / item.name)
    shutil.rmtree(previous)
