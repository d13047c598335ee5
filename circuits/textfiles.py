"""Reading a user's text file, with errors that name the file and what is wrong with it."""

from __future__ import annotations

from pathlib import Path

from circuits.errors import FileFormatError


def read_text(path: Path, kind: str) -> str:
    """The file's text: UTF-8, with or without a byte-order mark (as Excel writes it).

    Raises `FileFormatError` naming the file when it is missing, a folder, or not UTF-8 (with the line of
    the first bad byte). `kind` says what the file should be ("circuit file", "data file").
    """
    if not path.exists():
        raise FileFormatError(f"{path}: no such {kind}")
    if path.is_dir():
        raise FileFormatError(f"{path}: is a folder; give the {kind} itself")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise FileFormatError(
            f"{path}: line {line}: byte {err.object[err.start]:#04x} is not UTF-8; save the file as UTF-8"
        ) from None
