"""How edges (or nodes) are scored: one frozen options object, checked when it is made, shared by
`attribute`, `discover`, the bootstrap and stability code and the memory planner."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from circuits.attribution.methods import DEFAULT_METHOD, METHODS, MethodName, MethodSpec
from circuits.data import check_count
from circuits.errors import InputError
from circuits.models.relp import RelPRules
from circuits.quadrature import EDGE_QUADRATURES, Quadrature, check_rule, check_steps
from circuits.settings import with_settings
from circuits.sources import ABLATIONS, Ablation

Level = Literal["edge", "node"]


@dataclass(frozen=True)
class ScoringOptions:
    """A scoring method and its settings; a wrong value raises `InputError` here, before any work.

    Attributes:
        method: one of `eap`, `eap-ig-inputs`, `eap-ig-activations`, `clean-corrupted`, `relp`, `atp*`,
            `exact`.
        ig_steps, quadrature: the IG grid (`left` = EAP-IG's k/m, k=0..m-1; `midpoint`, `trapezoid`,
            `gauss-legendre`).
        ablation: what an edge carries when removed: the corrupted run's output (`patching`), the mean
            over reference prompts' clean runs (`mean`, per position when all lengths agree) or zero.
        level: `edge` scores edges (and nodes, for gradient methods); `node` scores nodes only.
        batch_size: pairs per batch.
        max_rows: rows per forward pass when IG steps / patched copies are stacked in the batch.
        max_memory: a budget in GiB for the weights, buffers and autograd activations of a call: the
            fastest `batch_size` / `max_rows` / `recompute` at most as large as given that the memory model
            (`circuits.attribution.memory`) fits within it; the scores do not change.
        recompute: keep one block's activations at a time in the backward passes and recompute each block
            when the backward pass reaches it (exact; one more forward pass of time).
        rules: RelP's backward rules (`RelPRules`); `relp` uses the paper's defaults unless given, and the
            other gradient methods take them too (e.g. `eap-ig-inputs` with RelP's backward).
    """

    method: MethodName = DEFAULT_METHOD
    ig_steps: int = 5
    quadrature: Quadrature = "left"
    ablation: Ablation = "patching"
    level: Level = "edge"
    batch_size: int = 8
    max_rows: int = 64
    max_memory: float | None = None
    recompute: bool = False
    rules: RelPRules | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(sorted(METHODS))}")
        spec = self.spec
        check_rule(self.quadrature)
        if self.quadrature == "idgi":
            raise InputError(
                "IDGI attributes one integrated tensor (use it with token_ig or neuron_ig); there is no "
                "IDGI edge score: its shares follow the gradient alone (features that do not move get "
                "credit, a layer's heads, which share one output gradient, get equal shares) and no split "
                "of a step keeps every cut of the graph exact (docs/design.md, section 4); choose one of "
                f"{', '.join(EDGE_QUADRATURES)}"
            )
        if self.ablation not in ABLATIONS:
            raise InputError(f"unknown ablation {self.ablation!r}; choose one of {', '.join(ABLATIONS)}")
        if spec.needs_corrupted and self.ablation != "patching":
            raise InputError(
                f"{self.method} interpolates between clean and corrupted prompts; it needs "
                "ablation='patching'"
            )
        if self.level not in ("edge", "node"):
            raise InputError(f"level must be 'edge' or 'node', got {self.level!r}")
        self._check_rules(spec)
        check_steps(self.ig_steps)
        check_count(self.batch_size, "batch_size")
        check_count(self.max_rows, "max_rows")
        memory = self.max_memory
        if memory is not None and (
            isinstance(memory, bool) or not isinstance(memory, int | float) or not 0 < memory < math.inf
        ):
            raise InputError(f"max_memory must be a finite positive number of GiB (or None), got {memory!r}")
        if self.recompute and not spec.recomputable:
            recomputable = [name for name, other in METHODS.items() if other.recomputable]
            raise InputError(
                f"{self.method} cannot recompute blocks in its backward pass (choose one of "
                f"{', '.join(recomputable)})"
            )

    def _check_rules(self, spec: MethodSpec) -> None:
        if self.rules is not None and not isinstance(self.rules, RelPRules):
            raise InputError(f"rules must be a RelPRules, got {type(self.rules).__name__}")
        if self.rules is not None and spec.backward in ("none", "own"):
            why = "takes no backward pass" if spec.backward == "none" else "has a backward pass of its own"
            raise InputError(f"{self.method} {why}, so RelP's rules do not apply to it")

    @property
    def spec(self) -> MethodSpec:
        """The registered method's facts."""
        return METHODS[self.method]

    @property
    def backward_rules(self) -> RelPRules | None:
        """The rules the backward passes run with: the given ones, RelP's defaults for `relp`, or none."""
        if self.rules is None and self.spec.backward == "relp":
            return RelPRules()
        return self.rules

    def with_settings(self, **settings: Any) -> ScoringOptions:
        """A copy with `settings` (any of the fields) changed, checked as a new one."""
        return with_settings(self, settings)
