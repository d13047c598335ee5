"""Options objects changed by keyword: the one place that turns `f(..., ig_steps=5)` into a new frozen
options object, refusing names it does not have with a typed error."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, TypeVar

from circuits.errors import InputError

Options = TypeVar("Options")


def with_settings(options: Options, settings: dict[str, Any]) -> Options:
    """A copy of the frozen dataclass `options` with `settings` changed (and checked again, as new)."""
    names = {f.name for f in fields(options)}  # type: ignore[arg-type]
    unknown = sorted(set(settings) - names)
    if unknown:
        kind = type(options).__name__
        raise InputError(f"unknown {kind} settings {unknown}; the settings are {', '.join(sorted(names))}")
    return replace(options, **settings)  # type: ignore[type-var]
