"""Prompt pairs from users' files: EAP-IG CSVs, MIB's IOI rows, and our own CSV / JSONL format.

Our format (CSV with a header, or JSON lines), one pair per row:
    clean, corrupted, answer, distractor
with answer / distractor as text, leading space included (" Mary", or several tokens: " Buenos Aires");
clean and corrupted prompts may differ in token length (`PromptPairs.alignment`). EAP-IG CSVs carry
token ids instead: `clean, corrupted, correct_idx, incorrect_idx`, or `clean, corrupted, label` with label
a list "[correct, incorrect]". MIB rows (the mib-bench datasets' `.parquet` files or `.json` / `.jsonl`
exports of them: IOI, MCQA, ARC, arithmetic) are read as MIB reads them (`circuits_tasks.mib`), each with its
counterfactual column. Every problem is reported with the file and row (1 = first data row).
"""

from __future__ import annotations

import ast
import csv
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from circuits.data import PromptPairs, branch_index, warn_unspaced
from circuits.errors import CircuitsWarning, FileFormatError, InputError
from circuits.models.hooked import HookedModel
from circuits.task import TaskPairs
from circuits.textfiles import read_text

from .mib import mib_pairs

Format = Literal["auto", "ours", "eap-ig", "mib", "mib-ioi"]
FORMATS: tuple[str, ...] = ("auto", "ours", "eap-ig", "mib", "mib-ioi")


def load_pairs(
    model: HookedModel,
    path: str | Path,
    *,
    format: Format = "auto",
    metric: str = "logit_diff",
    counterfactual: str | None = None,
    mib_task: str | None = None,
    drop_invalid: bool = False,
) -> TaskPairs:
    """Read prompt pairs for `model` from a CSV / JSON / JSONL / Parquet file (see the module docstring).

    `mib_task` (one of `circuits_tasks.mib.MIB_TASKS`) says which MIB dataset the rows are (found from the
    columns when not given); `counterfactual` names the counterfactual column (MIB's default per task).
    A row that cannot be used (a missing column, an empty answer, an answer the distractor merely
    continues, a token id outside the vocabulary, ...) raises `FileFormatError` naming every such row
    with its reason; with `drop_invalid` those rows are dropped instead, listed in a `CircuitsWarning` and
    counted in `TaskPairs.dropped`.
    """
    if format not in FORMATS:
        raise InputError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise FileFormatError(f"{path}: no rows")
    kind = _detect(path, rows[0]) if format == "auto" else format
    dropped = 0
    if kind in ("mib", "mib-ioi"):
        task = "ioi" if kind == "mib-ioi" else mib_task or _mib_task(path, rows[0])
        pairs, dropped = mib_pairs(model, path, rows, task, counterfactual)
    else:
        parse = _text_row if kind == "ours" else _eap_ig_row
        pairs, dropped = _collect(model, path, rows, parse, drop_invalid)
        if kind == "ours":  # answers written as text: do they have the space a next word takes?
            spaced = [r for r in rows if not str(r.get("clean", "")).endswith(" ")]
            warn_unspaced(model, [str(r.get(c) or "") for r in spaced for c in ("answer", "distractor")])
    return TaskPairs(path.stem, pairs, metric, len(rows), dropped)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix not in (".csv", ".json", ".jsonl", ".ndjson", ".parquet"):
        raise FileFormatError(
            f"{path}: unknown file type {path.suffix!r}; use .csv, .json, .jsonl or .parquet"
        )
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    text = read_text(path, "data file (.csv, .json or .jsonl)")
    if path.suffix == ".csv":
        try:  # header names stripped ("clean, corrupted, ..."); values kept as written (" Mary")
            return [
                {k.strip() if isinstance(k, str) else k: v for k, v in row.items()}
                for row in csv.DictReader(text.splitlines())
            ]
        except csv.Error as err:
            raise FileFormatError(f"{path}: not a readable CSV file ({err})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise FileFormatError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise FileFormatError(f"{path}: expected a JSON list of rows, got a {type(data).__name__}")
        rows = data
    else:
        rows = []
        for i, line in enumerate(l for l in text.splitlines() if l.strip()):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise FileFormatError(f"{path}: row {i + 1}: not valid JSON ({err.msg})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise FileFormatError(
                f"{path}: row {i + 1}: expected an object with named fields, got a {type(row).__name__}"
            )
    return rows


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet file (the format of the Hugging Face hub's dataset files), through pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    if not path.is_file():
        raise FileFormatError(f"{path}: no such data file")
    try:
        return list(pq.read_table(path).to_pylist())
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError alike
        raise FileFormatError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None


def _mib_task(path: Path, first: dict[str, Any]) -> str:
    """Which MIB dataset a row is from, by its columns."""
    if "metadata" in first:
        return "ioi"
    if "choices" in first and "answerKey" in first:
        return "mcqa"
    if "operator" in first:
        return "arithmetic-subtraction" if first.get("operator") == "-" else "arithmetic-addition"
    raise FileFormatError(f"{path}: cannot tell which MIB dataset the columns {sorted(first)} are from")


def _detect(path: Path, first: dict[str, Any]) -> str:
    if "prompt" in first and ({"metadata", "answerKey", "operator"} & set(first)):
        return "mib"
    if "correct_idx" in first or "label" in first:
        return "eap-ig"
    if "answer" in first:
        return "ours"
    raise FileFormatError(
        f"{path}: cannot tell the format from the columns {sorted(first)}; expected clean, corrupted, "
        "answer, distractor (ours), correct_idx / incorrect_idx or label (EAP-IG), or prompt with metadata, "
        "answerKey or operator (MIB)"
    )


def _require(path: Path, i: int, row: dict[str, Any], columns: tuple[str, ...]) -> list[Any]:
    missing = [c for c in columns if row.get(c) in (None, "")]
    if missing:
        raise FileFormatError(f"{path}: row {i + 1}: missing {', '.join(missing)}")
    return [row[c] for c in columns]


Row = tuple[str, str, list[int], list[int]]  # clean, corrupted, answer ids, distractor ids


def _text_row(model: HookedModel, path: Path, i: int, row: dict[str, Any]) -> Row:
    c, k, a, d = (str(v) for v in _require(path, i, row, ("clean", "corrupted", "answer", "distractor")))
    answer, distractor = (model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (a, d))
    if len(answer) > 1 or len(distractor) > 1:
        try:
            branch_index(answer, distractor, i)
        except InputError as err:
            raise FileFormatError(f"{path}: row {i + 1}: {str(err).removeprefix(f'pair {i}: ')}") from None
    return c, k, answer, distractor


def _eap_ig_row(model: HookedModel, path: Path, i: int, row: dict[str, Any]) -> Row:
    c, k = (str(v) for v in _require(path, i, row, ("clean", "corrupted")))
    if "label" in row and "correct_idx" not in row:
        (label,) = _require(path, i, row, ("label",))
        try:
            ids = ast.literal_eval(label) if isinstance(label, str) else label
            correct, incorrect = ids[0], ids[1]
        except (ValueError, SyntaxError, TypeError, IndexError, KeyError):
            raise FileFormatError(
                f"{path}: row {i + 1}, column label: {label!r} is not a list [correct, incorrect]"
            ) from None
        correct, incorrect = _int(path, i, "label", correct), _int(path, i, "label", incorrect)
    else:
        values = _require(path, i, row, ("correct_idx", "incorrect_idx"))
        correct, incorrect = (
            _int(path, i, col, v) for col, v in zip(("correct_idx", "incorrect_idx"), values)
        )
    for name, t in (("correct", correct), ("incorrect", incorrect)):
        if not 0 <= t < model.d_vocab:
            raise FileFormatError(
                f"{path}: row {i + 1}: {name} token id {t} is outside the vocabulary [0, {model.d_vocab})"
            )
    return c, k, [correct], [incorrect]


def _collect(
    model: HookedModel,
    path: Path,
    rows: list[dict[str, Any]],
    parse: Callable[[HookedModel, Path, int, dict[str, Any]], Row],
    drop_invalid: bool,
) -> tuple[PromptPairs, int]:
    """The pairs of every row `parse` accepts, and how many rows it refused. A refused row raises
    `FileFormatError` naming every such row, or, with `drop_invalid`, is dropped with a `CircuitsWarning`
    that lists each one and why."""
    kept: list[Row] = []
    problems: list[str] = []
    for i, row in enumerate(rows):
        try:
            kept.append(parse(model, path, i, row))
        except FileFormatError as problem:
            problems.append(str(problem).removeprefix(f"{path}: "))
    shown = "\n  ".join(problems[:20]) + (
        f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    )
    if problems and (not drop_invalid or not kept):
        what = "every row is invalid" if kept == [] and drop_invalid else f"{len(problems)} invalid row(s)"
        hint = "" if drop_invalid else " (drop_invalid=True, or --skip-invalid in the CLI, drops them)"
        raise FileFormatError(f"{path}: {what}{hint}:\n  {shown}")
    if problems:
        warnings.warn(
            f"{path}: {len(problems)} of {len(rows)} rows dropped:\n  {shown}", CircuitsWarning, stacklevel=3
        )
    clean, corrupted, answers, distractors = (list(column) for column in zip(*kept))
    texts = list(zip(clean, corrupted))
    pairs = PromptPairs.from_ids(
        model, model.to_ids(clean), model.to_ids(corrupted), answers, distractors, texts
    )
    return pairs, len(problems)


def _int(path: Path, i: int, column: str, value: Any) -> int:
    """A token id: an integer, or text / a float holding one exactly ("12", 12.0); never 3.7."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int):
        raise FileFormatError(
            f"{path}: row {i + 1}, column {column}: {value!r} is not a token id (an integer)"
        )
    return number
