"""How sure a circuit's numbers are: bootstrap confidence intervals over examples (percentile intervals,
Efron & Tibshirani 1993) for faithfulness, CPR and CMD, the stability of a circuit across bootstrap
resamples of the prompt pairs (Jaccard index of the edge sets), and the bootstrap sign-consistency filter
for edge selection.

The intervals resample the per-example metrics an evaluation already holds (no model passes): for each
resample, f = (mean M(C) - mean M(empty)) / (mean M(full) - mean M(empty)) over the drawn examples, and
CPR / CMD are the areas of those f over the curve's fixed x. Stability re-scores each resample with the
method and compares the selected circuits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from circuits.attribution import ScoringOptions, attribute
from circuits.data import as_pairs
from circuits.errors import InputError, NumericalError
from circuits.evaluation import Evaluation
from circuits.graph import Graph
from circuits.metrics import Metric
from circuits.models.hooked import HookedModel, uses_model
from circuits.models.ungroup import model_for
from circuits.task import Pairs

if TYPE_CHECKING:
    from circuits.evaluation.curves import FaithfulnessCurve

RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A statistic on all examples and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    level: float
    resamples: int

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}


MAX_RESAMPLES = 100_000  # far more than any percentile interval needs; keeps the draws within memory


def check_resamples(resamples: object, name: str = "resamples") -> int:
    """A bootstrap resample count: a whole number in [2, MAX_RESAMPLES] (one resample compares nothing and
    has no spread), else `InputError`."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or not 2 <= resamples <= MAX_RESAMPLES:
        raise InputError(
            f"{name} must be a whole number from 2 to {MAX_RESAMPLES:,} (one resample has no spread and "
            f"compares nothing; 0 where allowed: none), got {resamples!r}"
        )
    return resamples


def check_level(level: object) -> float:
    """A confidence level: a number in (0, 1), else `InputError`."""
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0 < level < 1:
        raise InputError(f"level must be a number in (0, 1), such as 0.95; got {level!r}")
    return float(level)


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> Tensor:
    """[resamples, n] example indices drawn with replacement (seeded)."""
    check_resamples(resamples)
    if n < 2:
        raise InputError(f"a bootstrap over {n} example(s) says nothing: give at least 2")
    return torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def percentile_interval(estimate: float, values: Tensor, level: float) -> Interval:
    """`estimate` with the `level` percentile interval of its resampled `values` [resamples]."""
    level = check_level(level)
    finite = values[values.isfinite()]
    if len(finite) < len(values):
        raise NumericalError(
            f"{len(values) - len(finite)} of {len(values)} resamples have M(full) = M(empty): faithfulness "
            "is undefined on them (too few examples that the corruption changes)"
        )
    tail = (1 - level) / 2
    low, high = torch.quantile(values.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(estimate, low, high, level, len(values))


def _per_example(evaluation: Evaluation) -> tuple[Tensor, Tensor, Tensor]:
    if evaluation.full_per_example is None or evaluation.empty_per_example is None:
        raise InputError("this evaluation has no per-example metrics of the full model and the empty circuit")
    return (
        evaluation.per_example.double(),
        evaluation.full_per_example.double(),
        evaluation.empty_per_example.double(),
    )


def _resampled_faithfulness(circuit: Tensor, full: Tensor, empty: Tensor, draws: Tensor) -> Tensor:
    """[resamples] f of each resample; circuit may be [N] or [points, N] (then [resamples, points])."""
    e = empty[draws].mean(-1)
    scale = full[draws].mean(-1) - e
    c = circuit[..., draws].mean(-1)  # [..., resamples]
    return ((c - e) / scale).T if c.dim() == 2 else (c - e) / scale


def faithfulness_interval(
    evaluation: Evaluation, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> Interval:
    """The circuit's faithfulness with its bootstrap interval over the evaluated examples."""
    check_level(level)
    circuit, full, empty = _per_example(evaluation)
    draws = resample_indices(len(circuit), resamples, seed)
    return percentile_interval(
        evaluation.faithfulness, _resampled_faithfulness(circuit, full, empty, draws), level
    )


def _trapezoid(x: Tensor, y: Tensor) -> Tensor:
    """Area under y [..., points] over x [points] (the rule of `circuits.evaluation.curves.area`)."""
    return ((x[1:] - x[:-1]) * (y[..., 1:] + y[..., :-1]) / 2).sum(-1)


def curve_intervals(
    curve: FaithfulnessCurve, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> tuple[Interval, Interval]:
    """Bootstrap intervals of the curve's area under f (CPR) and under |1 - f| (CMD)."""
    check_level(level)
    if curve.full_per_example is None or curve.empty_per_example is None or not curve.per_example:
        raise InputError("this curve has no per-example metrics (made by faithfulness_curve?)")
    circuits = torch.stack(curve.per_example).double()  # [points, N]
    full, empty = curve.full_per_example.double(), curve.empty_per_example.double()
    draws = resample_indices(circuits.shape[1], resamples, seed)
    f = _resampled_faithfulness(circuits, full, empty, draws)  # [resamples, points]
    x = torch.tensor([p.fraction for p in curve.points], dtype=torch.float64)
    under = percentile_interval(curve.area_under, _trapezoid(x, f), level)
    from_one = percentile_interval(curve.area_from_one, _trapezoid(x, (1 - f).abs()), level)
    return under, from_one


@dataclass(frozen=True)
class Stability:
    """Jaccard index |A & B| / |A | B| of the edge sets of circuits selected on bootstrap resamples."""

    to_full: Tensor  # [resamples] each resample's circuit against the circuit of all pairs
    pairwise: float  # mean over pairs of resamples

    @property
    def mean(self) -> float:
        return float(self.to_full.mean())

    def __str__(self) -> str:
        return (
            f"stability over {len(self.to_full)} resamples: Jaccard with the full-data circuit "
            f"{self.mean:.3f} (min {float(self.to_full.min()):.3f}), between resamples {self.pairwise:.3f}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"jaccard_to_full": self.to_full.tolist(), "mean": self.mean, "pairwise": self.pairwise}


def jaccard(a: Tensor, b: Tensor) -> float:
    """|a & b| / |a | b| of two bool edge masks (1 for two empty sets)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


@uses_model
def bootstrap_scores(
    model: HookedModel,
    pairs: Pairs,
    metric: str | Metric | None = None,
    scoring: ScoringOptions | None = None,
    *,
    resamples: int = 10,
    seed: int = 0,
    ungrouped: bool = False,
) -> Tensor:
    """Edge scores [resamples, n_sources, n_destinations] on bootstrap resamples of `pairs`, each scored
    as `scoring` says (default `ScoringOptions()`), of the model's graph (`ungrouped`: its ungrouped one,
    `Graph.from_model`)."""
    pairs = as_pairs(pairs)
    scoring = scoring or ScoringOptions()
    if scoring.level != "edge":
        raise InputError(
            f"bootstrap scores are edge scores: scoring.level must be 'edge', got {scoring.level!r}"
        )
    scores = []
    for row in resample_indices(len(pairs), resamples, seed):
        found = attribute(
            model, Graph.from_model(model, ungrouped), pairs.take(row), metric, options=scoring, quiet=True
        )
        assert found.edge_scores is not None
        scores.append(found.edge_scores)
    return torch.stack(scores)


@uses_model
def circuit_stability(
    model: HookedModel,
    circuit: Graph,
    pairs: Pairs,
    metric: str | Metric | None = None,
    scoring: ScoringOptions | None = None,
    *,
    n_edges: int,
    resamples: int = 10,
    seed: int = 0,
) -> Stability:
    """Re-score `resamples` bootstrap resamples of `pairs` as `scoring` says and keep the top `n_edges`
    edges of each (pruned, as `Graph.top_n`); compare their edge sets with `circuit` (the circuit of all
    pairs)."""
    if not isinstance(circuit, Graph):
        raise InputError(f"circuit must be a Graph, got {type(circuit).__name__}")
    circuit.check_fits(model_for(model, circuit.spec).spec)  # another model's circuit: GraphMismatchError
    masks = []
    ungrouped = circuit.spec.n_kv_heads != model.spec.n_kv_heads  # re-score the circuit's kind of graph
    for scores in bootstrap_scores(
        model, pairs, metric, scoring, resamples=resamples, seed=seed, ungrouped=ungrouped
    ):
        graph = Graph(circuit.spec)
        graph.scores = scores
        found = graph.top_n(min(n_edges, graph.n_edges))
        masks.append(found.in_graph & found.valid)
    full = circuit.in_graph & circuit.valid
    to_full = torch.tensor([jaccard(m, full) for m in masks])
    pairs_of = [(i, j) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    pairwise = sum(jaccard(masks[i], masks[j]) for i, j in pairs_of) / len(pairs_of) if pairs_of else 1.0
    return Stability(to_full, pairwise)


def sign_consistent(graph: Graph, resampled: Tensor | Sequence[Tensor], agreement: float = 0.9) -> Graph:
    """Bootstrap sign-consistency filtering (after the BlackboxNLP 2025 MIB shared task, arXiv 2510.25786):
    a copy of `graph` whose score is set to 0 on every edge whose sign on the resamples
    (`bootstrap_scores`, [R, n_sources, n_destinations], or a sequence of R score tensors) agrees with its
    full-data sign in fewer than `agreement` of them, so that selection takes the consistent edges first."""
    if isinstance(agreement, bool) or not isinstance(agreement, int | float) or not 0 < agreement <= 1:
        raise InputError(f"agreement must be a fraction in (0, 1], got {agreement!r}")
    if not isinstance(resampled, Tensor):
        if not all(isinstance(t, Tensor) for t in resampled):
            raise InputError("resampled must be a tensor [R, n_sources, n_destinations] or a list of them")
        resampled = torch.stack(list(resampled)) if len(resampled) else torch.empty(0)
    if resampled.dim() != 3 or len(resampled) < 2:
        raise InputError(
            f"sign consistency needs the scores of 2 or more resamples, [R, n_sources, n_destinations]; got "
            f"shape {tuple(resampled.shape)}"
        )
    if resampled.shape[1:] != graph.scores.shape:
        raise InputError(
            f"resampled scores have shape {tuple(resampled.shape)}; "
            f"the graph's scores {tuple(graph.scores.shape)}"
        )
    agrees = (resampled.sign() == graph.scores.sign()[None]).double().mean(0)
    filtered = graph.copy()
    filtered.scores = torch.where(agrees >= agreement, graph.scores, torch.zeros_like(graph.scores))
    return filtered
