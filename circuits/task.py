"""What a task hands the toolkit, and where the command line finds tasks without importing them.

A task plug-in is a module with `TASKS` (name -> builder `(model, n, seed=0) -> TaskPairs`) and
`load_pairs(model, path, drop_invalid=False) -> TaskPairs` (prompt pairs from a user's file; the keyword is
passed only when true), announced under the entry-point group `circuits.tasks`. This project's own tasks
(the folder `tasks/`, installed as `circuits_tasks`) are one; another package can add tasks the same way.
`circuits` itself never imports a task module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Protocol

from circuits.data import PromptPairs
from circuits.errors import InputError
from circuits.metrics import Metric, get_metric
from circuits.models.hooked import HookedModel
from circuits.spans import Spans

ENTRY_POINT_GROUP = "circuits.tasks"


@dataclass
class TaskPairs:
    """Prompt pairs made for one model, the metric the task is scored with, and what could not be made."""

    task: str
    pairs: PromptPairs
    metric: str | Metric  # a name in circuits.metrics.METRICS, or a task-specific metric
    requested: int
    dropped: int  # proposed examples rejected (multi-token answers, unequal lengths)
    seed: int | None = None  # the generator's seed (`make_task`); None for a data file
    spans: Spans | None = None  # where the generator knows its templates: the clean prompts' spans

    def __post_init__(self) -> None:
        # the pairs carry the task's metric, so `evaluate(model, circuit, task.pairs)` scores as the task does
        if self.pairs.metric is None:
            self.pairs = replace(self.pairs, metric=self.metric)

    def __str__(self) -> str:
        return f"{self.task}: {len(self.pairs)} pairs ({self.dropped} proposals dropped)"


Pairs = PromptPairs | TaskPairs  # what every function taking prompt pairs accepts (`data.as_pairs`)


class TaskBuilder(Protocol):
    def __call__(self, model: HookedModel, n: int, seed: int = 0) -> TaskPairs: ...


@cache
def _plugins() -> tuple[ModuleType, ...]:
    found = tuple(point.load() for point in entry_points(group=ENTRY_POINT_GROUP))
    if not found:
        raise InputError(
            f"no task plug-ins are installed (entry-point group {ENTRY_POINT_GROUP!r}); install this project "
            "with `pip install -e .` (`make setup` does) so that its `circuits_tasks` package is found"
        )
    return found


def task_builders() -> dict[str, TaskBuilder]:
    """Every installed task, by name."""
    builders: dict[str, TaskBuilder] = {}
    for plugin in _plugins():
        builders.update(getattr(plugin, "TASKS", {}))
    return builders


def file_loader() -> Callable[..., TaskPairs]:
    """The first installed plug-in's `load_pairs` (prompt pairs from a user's data file)."""
    for plugin in _plugins():
        if hasattr(plugin, "load_pairs"):
            return plugin.load_pairs  # type: ignore[no-any-return]
    raise InputError("no installed task plug-in reads data files (none has load_pairs)")


def make_task(
    model: HookedModel,
    name: str | None = None,
    n: int = 32,
    *,
    seed: int = 0,
    data: str | Path | None = None,
    metric: str | Metric | None = None,
    drop_invalid: bool = False,
) -> TaskPairs:
    """Prompt pairs for `model`: `n` of the installed task `name` (`task_builders()`: ioi, greater_than,
    ...), or a user's data file `data` (read by the installed plug-in's `load_pairs`); scored with the
    task's own metric, or `metric` if given (the pairs carry it: see `PromptPairs.metric`). With
    `drop_invalid`, a data file's unusable rows are dropped (each listed in a warning), not refused."""
    if (name is None) == (data is None):
        raise InputError("give a task name or a data file (one of them)")
    if data is not None:
        loader = file_loader()
        task = loader(model, data, drop_invalid=True) if drop_invalid else loader(model, data)
    else:
        builders = task_builders()
        if name not in builders:
            raise InputError(f"unknown task {name!r}; the installed tasks are {', '.join(sorted(builders))}")
        task = replace(builders[name](model, n, seed=seed), seed=seed)
    if metric is None:
        return task
    get_metric(metric)  # an unknown name fails here, before any work
    return replace(task, metric=metric, pairs=replace(task.pairs, metric=metric))
