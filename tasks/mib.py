"""Rows of MIB's circuit-track datasets (the mib-bench datasets on the Hugging Face hub: ioi,
copycolors_mcqa, arc_easy, arc_challenge, arithmetic_addition, arithmetic_subtraction), read from a local
copy of their files (`.parquet`, or `.json` / `.jsonl` exports), as MIB's own loader
(`MIB_circuit_track/dataset.py`, `HFEAPDataset`) turns them into prompt pairs:

- ioi: clean `prompt`, corrupted `s2_io_flip_counterfactual.prompt` (the default column); answer and
  distractor: the first tokens of " " + `metadata.indirect_object` and " " + `metadata.subject`;
- mcqa, arc-easy, arc-challenge: `prompt`, `symbol_counterfactual.prompt`; the first tokens of
  `choices.label[answerKey]` and of the counterfactual's;
- arithmetic-addition, -subtraction: `prompt`, `random_counterfactual.prompt`; the tokens of `label` and
  of the counterfactual's `label`.

Rows MIB's filter drops are dropped here too, and counted in a warning: IOI rows whose three names
(`indirect_object`, `subject`, `random_c`) tokenize to different lengths; MCQA / ARC rows whose answer and
counterfactual answer do; arithmetic rows of the other operator (`+` for addition, `-` for subtraction)
or without a one-token label. Rows whose clean and corrupted prompts differ in token length are kept, their
positions aligned by the prompts' ends (`PromptPairs.alignment`); MIB's own pipeline (EAP-IG) runs the
corrupted prompt under the clean prompt's mask instead, so on such rows its positions do not correspond.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from circuits.data import PromptPairs
from circuits.errors import CircuitsWarning, FileFormatError, InputError
from circuits.models.hooked import HookedModel

Row = dict[str, Any]
Pair = tuple[str, str, int, int]  # clean, corrupted, answer token, distractor token

DEFAULT_COUNTERFACTUAL = {
    "ioi": "s2_io_flip_counterfactual",
    "mcqa": "symbol_counterfactual",
    "arc-easy": "symbol_counterfactual",
    "arc-challenge": "symbol_counterfactual",
    "arithmetic-addition": "random_counterfactual",
    "arithmetic-subtraction": "random_counterfactual",
}
MIB_TASKS: tuple[str, ...] = tuple(DEFAULT_COUNTERFACTUAL)


def mib_pairs(
    model: HookedModel, path: Path, rows: list[Row], task: str, counterfactual: str | None = None
) -> tuple[PromptPairs, int]:
    """The prompt pairs MIB makes of `rows` for `task` (one of `MIB_TASKS`), with MIB's filter, and how
    many rows the filter dropped (each reason counted in a warning)."""
    if task not in DEFAULT_COUNTERFACTUAL:
        raise InputError(f"unknown MIB task {task!r}; choose one of {', '.join(MIB_TASKS)}")
    column = counterfactual or DEFAULT_COUNTERFACTUAL[task]
    convert = _ioi if task == "ioi" else _arithmetic if task.startswith("arithmetic") else _choices
    kept: list[Pair] = []
    reasons: Counter[str] = Counter()  # why MIB's filter dropped rows
    for i, row in enumerate(rows):
        cf = row.get(column)
        if not isinstance(cf, dict) and task.startswith("arithmetic"):  # MIB drops rows without one
            reasons[f"no {column}"] += 1
            continue
        pair = convert(model, task, row, _field(path, i, row, column, dict), path, i)
        if isinstance(pair, str):
            reasons[pair] += 1
            continue
        kept.append(pair)
    why = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    if not kept:
        raise FileFormatError(
            f"{path}: no row of {len(rows)} is usable for {task} with this tokenizer ({why})"
        )
    dropped = sum(reasons.values())
    if dropped:
        warnings.warn(
            f"{path}: {dropped} of {len(rows)} rows dropped by MIB's filter for {task} ({why})",
            CircuitsWarning,
            stacklevel=3,
        )
    clean, corrupted, answers, distractors = (list(column) for column in zip(*kept))
    pairs = PromptPairs.from_ids(
        model, model.to_ids(clean), model.to_ids(corrupted), answers, distractors, list(zip(clean, corrupted))
    )
    return pairs, dropped


def _field(path: Path, i: int, row: Row, name: str, kind: type) -> Any:
    value = row.get(name)
    if not isinstance(value, kind) or value in ("", None):
        wanted = "an object" if kind is dict else "text" if kind is str else kind.__name__
        raise FileFormatError(f"{path}: row {i + 1}: column {name} must be {wanted}, got {value!r}")
    return value


def _label(value: Any) -> str:
    """An arithmetic label as MIB's data holds it: a number (7, or 7.0 from a float column) as its digits."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _tokens(model: HookedModel, text: str) -> list[int]:
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def _ioi(model: HookedModel, _task: str, row: Row, cf: Row, path: Path, i: int) -> Pair | str:
    meta = _field(path, i, row, "metadata", dict)
    names = [_field(path, i, meta, key, str) for key in ("indirect_object", "subject")]
    third = meta.get("random_c")
    lengths = {len(_tokens(model, f" {n}")) for n in [*names, *([third] if isinstance(third, str) else [])]}
    if len(lengths) > 1:
        return "with names of different token lengths"
    answer, distractor = (_tokens(model, f" {n}")[0] for n in names)
    return _field(path, i, row, "prompt", str), _field(path, i, cf, "prompt", str), answer, distractor


def _choice_label(path: Path, i: int, row: Row) -> str:
    choices = _field(path, i, row, "choices", dict)
    labels, key = choices.get("label"), row.get("answerKey")
    if not isinstance(labels, list) or not isinstance(key, int) or not 0 <= key < len(labels):
        raise FileFormatError(f"{path}: row {i + 1}: answerKey {key!r} is not an index into choices.label")
    return str(labels[key])


def _choices(model: HookedModel, _task: str, row: Row, cf: Row, path: Path, i: int) -> Pair | str:
    right, wrong = _choice_label(path, i, row), _choice_label(path, i, cf)
    a, b = _tokens(model, right), _tokens(model, wrong)
    if len(a) != len(b) or not a:
        return "with answers of different token lengths"
    return _field(path, i, row, "prompt", str), _field(path, i, cf, "prompt", str), a[0], b[0]


def _arithmetic(model: HookedModel, task: str, row: Row, cf: Row, path: Path, i: int) -> Pair | str:
    operator = "+" if task == "arithmetic-addition" else "-"
    if row.get("operator") != operator:
        return f"of another operator than {operator!r}"
    if cf.get("prompt") is None:
        return "whose counterfactual has no prompt"
    a, b = _tokens(model, _label(row.get("label"))), _tokens(model, _label(cf.get("label")))
    if len(a) != 1 or len(b) != 1:
        return "whose label or counterfactual label is not one token"
    return _field(path, i, row, "prompt", str), _field(path, i, cf, "prompt", str), a[0], b[0]
