"""Prompt pairs from users' files: EAP-IG CSVs, MIB's IOI rows, and our own CSV / JSONL format.

Our format (CSV with a header, or JSON lines), one pair per row:
    clean, corrupted, answer, distractor
with answer / distractor as text of a single token, leading space included (" Mary"). EAP-IG CSVs carry
token ids instead: `clean, corrupted, correct_idx, incorrect_idx`, or `clean, corrupted, label` with label
a list "[correct, incorrect]". MIB IOI rows (JSON / JSON lines, as in the mib-bench/ioi dataset) give
`prompt`, `metadata.indirect_object`, `metadata.subject` and the counterfactual prompt under a column such
as `s2_io_flip_counterfactual`. Every problem is reported with the file and row (1 = first data row).
"""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path
from typing import Any, Literal

from circuits.data import PromptPairs
from circuits.models.hooked import HookedModel
from tasks.common import TaskPairs

Format = Literal["auto", "ours", "eap-ig", "mib-ioi"]


class DataFileError(ValueError):
    """A prompt-pair file that cannot be used, with the row and the reason."""


def load_pairs(
    model: HookedModel,
    path: str | Path,
    *,
    format: Format = "auto",
    metric: str = "logit_diff",
    counterfactual: str = "s2_io_flip_counterfactual",
) -> TaskPairs:
    """Read prompt pairs for `model` from a CSV / JSON / JSONL file (see the module docstring for formats)."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    rows = _read_rows(path)
    if not rows:
        raise DataFileError(f"{path}: no rows")
    kind = _detect(path, rows[0]) if format == "auto" else format
    if kind == "ours":
        pairs = _from_text_rows(model, path, rows, ("clean", "corrupted", "answer", "distractor"))
    elif kind == "mib-ioi":
        pairs = _from_mib_rows(model, path, rows, counterfactual)
    elif kind == "eap-ig":
        pairs = _from_eap_ig_rows(model, path, rows)
    else:
        raise ValueError(f"unknown format {format!r}; choose auto, ours, eap-ig or mib-ioi")
    return TaskPairs(path.stem, pairs, metric, len(rows), 0)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise DataFileError(f"{path}: expected a JSON list of rows")
        return data
    if path.suffix in (".jsonl", ".ndjson"):
        rows = []
        for i, line in enumerate(l for l in text.splitlines() if l.strip()):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}: row {i + 1}: not valid JSON ({err.msg})") from None
        return rows
    raise DataFileError(f"{path}: unknown file type {path.suffix!r}; use .csv, .json or .jsonl")


def _detect(path: Path, first: dict[str, Any]) -> str:
    if "prompt" in first and "metadata" in first:
        return "mib-ioi"
    if "correct_idx" in first or "label" in first:
        return "eap-ig"
    if "answer" in first:
        return "ours"
    raise DataFileError(
        f"{path}: cannot tell the format from the columns {sorted(first)}; expected clean, corrupted, "
        "answer, distractor (ours), correct_idx / incorrect_idx or label (EAP-IG), or prompt and metadata "
        "(MIB IOI)"
    )


def _require(path: Path, i: int, row: dict[str, Any], columns: tuple[str, ...]) -> list[Any]:
    missing = [c for c in columns if row.get(c) in (None, "")]
    if missing:
        raise DataFileError(f"{path}: row {i + 1}: missing {', '.join(missing)}")
    return [row[c] for c in columns]


def _check_lengths(model: HookedModel, path: Path, i: int, clean: str, corrupted: str) -> None:
    a, b = model.to_ids([clean, corrupted])
    if len(a) != len(b):
        raise DataFileError(
            f"{path}: row {i + 1}: clean prompt is {len(a)} tokens, corrupted is {len(b)} "
            f"for {model.spec.name}"
        )


def _token(model: HookedModel, path: Path, i: int, text: str) -> int:
    try:
        return model.single_token_id(text)
    except ValueError as err:
        raise DataFileError(f"{path}: row {i + 1}: {err}") from None


def _from_text_rows(
    model: HookedModel, path: Path, rows: list[dict[str, Any]], columns: tuple[str, str, str, str]
) -> PromptPairs:
    clean, corrupted, answers, distractors = [], [], [], []
    for i, row in enumerate(rows):
        c, k, a, d = (str(v) for v in _require(path, i, row, columns))
        _check_lengths(model, path, i, c, k)
        answers.append(_token(model, path, i, a))
        distractors.append(_token(model, path, i, d))
        clean.append(c)
        corrupted.append(k)
    return PromptPairs.from_ids(
        model, model.to_ids(clean), model.to_ids(corrupted), answers, distractors, list(zip(clean, corrupted))
    )


def _from_mib_rows(
    model: HookedModel, path: Path, rows: list[dict[str, Any]], counterfactual: str
) -> PromptPairs:
    flat = []
    for i, row in enumerate(rows):
        prompt, metadata, cf = _require(path, i, row, ("prompt", "metadata", counterfactual))
        if not isinstance(metadata, dict) or not isinstance(cf, dict) or "prompt" not in cf:
            raise DataFileError(
                f"{path}: row {i + 1}: metadata and {counterfactual} must be objects with fields"
            )
        io, subject = _require(path, i, metadata, ("indirect_object", "subject"))
        flat.append(
            {"clean": prompt, "corrupted": cf["prompt"], "answer": f" {io}", "distractor": f" {subject}"}
        )
    return _from_text_rows(model, path, flat, ("clean", "corrupted", "answer", "distractor"))


def _from_eap_ig_rows(model: HookedModel, path: Path, rows: list[dict[str, Any]]) -> PromptPairs:
    clean, corrupted, answers, distractors = [], [], [], []
    for i, row in enumerate(rows):
        c, k = (str(v) for v in _require(path, i, row, ("clean", "corrupted")))
        if "label" in row and "correct_idx" not in row:
            (label,) = _require(path, i, row, ("label",))
            try:
                ids = ast.literal_eval(str(label))
                correct, incorrect = int(ids[0]), int(ids[1])
            except (ValueError, SyntaxError, TypeError, IndexError):
                raise DataFileError(
                    f"{path}: row {i + 1}: label {label!r} is not a list [correct, incorrect]"
                ) from None
        else:
            correct, incorrect = (
                _int(path, i, v) for v in _require(path, i, row, ("correct_idx", "incorrect_idx"))
            )
        for name, t in (("correct", correct), ("incorrect", incorrect)):
            if not 0 <= t < model.d_vocab:
                raise DataFileError(f"{path}: row {i + 1}: {name} token id {t} is outside the vocabulary")
        _check_lengths(model, path, i, c, k)
        clean.append(c)
        corrupted.append(k)
        answers.append(correct)
        distractors.append(incorrect)
    return PromptPairs.from_ids(
        model, model.to_ids(clean), model.to_ids(corrupted), answers, distractors, list(zip(clean, corrupted))
    )


def _int(path: Path, i: int, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataFileError(f"{path}: row {i + 1}: {value!r} is not a token id") from None
