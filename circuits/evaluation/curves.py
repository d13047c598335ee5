"""Faithfulness curves over circuit sizes and the MIB circuit metrics CPR and CMD (MIB, Mueller et al. 2025,
arXiv 2504.13151), computed as MIB's circuit-track evaluation computes them (docs/mib.md).

For each edge budget (a percentage of the graph's edges) a circuit is selected from the scores, pruned and
evaluated. With f = (M(circuit) - M(empty)) / (M(full) - M(empty)), each M a mean over the examples:
- CPR (circuit performance ratio) = area under f(x), trapezoid rule over the points, linear x;
  circuits selected by signed score (the edges that help the metric most), higher is better;
- CMD (circuit-model distance) = area under |1 - f(x)|; circuits selected by |score|, lower is better.

Protocols (`protocol=`):
- `mib` (default), MIB's: the budget is int(fraction x edges) edges of EAP-IG's graph, where a GQA
  model's k/v inputs are ungrouped; x is the requested fraction, whatever pruning leaves. On the ungrouped
  graph (`Graph.from_model(model, ungrouped=True)`) these are MIB's numbers. On a GQA model's grouped graph
  the budgets count the same way (an edge into a shared k/v input counts n_heads / n_kv_heads times), but
  a key/value head's edge goes in or out with all its copies, ranked by its share of their summed score,
  where MIB ranks each copy by its own: an approximation, which a `CircuitsWarning` names.
- `pruned`, this toolkit's first protocol: the budget is round(fraction x edges) of our graph and x is the
  fraction of edges left after pruning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from torch import Tensor

from circuits.errors import CircuitsWarning, InputError
from circuits.evaluation import Evaluation, evaluate_many
from circuits.evaluation.intervals import LEVEL, RESAMPLES, Interval, curve_intervals
from circuits.graph import Graph
from circuits.metrics import Metric
from circuits.models.hooked import HookedModel, uses_model
from circuits.selection.strategies import Selection, Selector, mib_edge_weights, select, selection_name
from circuits.settings import with_settings
from circuits.sources import Ablation
from circuits.span_graph import SpanGraph
from circuits.spans import Spans
from circuits.task import Pairs

MIB_PERCENTAGES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
CurveProtocol = Literal["mib", "pruned"]  # how budgets and x values are counted (module docstring)
PROTOCOLS: tuple[str, ...] = ("mib", "pruned")


@dataclass
class CurvePoint:
    percent: float  # budget, % of the graph's edges
    n_edges: int  # edges in the circuit after pruning
    fraction: float  # x of the curve: the budget's fraction (mib) or n_edges / all edges (pruned)
    metric: float  # mean metric of the circuit
    faithfulness: float


@dataclass(frozen=True)
class FaithfulnessCurve:
    label: str
    absolute: bool  # selection by |score| (CMD) or by signed score (CPR)
    full: float  # mean metric of the full model
    empty: float  # mean metric of the empty circuit
    points: list[CurvePoint] = field(default_factory=list)
    # per-example metrics, for bootstrap intervals (`circuits.evaluation.intervals`): [N] each, one per point
    full_per_example: Tensor | None = field(default=None, repr=False)
    empty_per_example: Tensor | None = field(default=None, repr=False)
    per_example: list[Tensor] = field(default_factory=list, repr=False)

    @property
    def area_under(self) -> float:
        """Area under f(x) (CPR when the selection is signed)."""
        return area([p.fraction for p in self.points], [p.faithfulness for p in self.points])

    @property
    def area_from_one(self) -> float:
        """Area under |1 - f(x)| (CMD when the selection is absolute)."""
        return area([p.fraction for p in self.points], [abs(1 - p.faithfulness) for p in self.points])

    def to_dict(self) -> dict:
        """The curve without its per-example tensors (for JSON)."""
        plain = {k: v for k, v in asdict(self).items() if k not in _PER_EXAMPLE}
        return {**plain, "area_under": self.area_under, "area_from_one": self.area_from_one}


_PER_EXAMPLE = ("full_per_example", "empty_per_example", "per_example")


def area(x: Sequence[float], y: Sequence[float]) -> float:
    """Trapezoid rule over consecutive points (x ascending)."""
    return sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1))


@dataclass(frozen=True)
class CurveOptions:
    """How a faithfulness curve is measured; a wrong value raises `InputError` here.

    Attributes:
        absolute: rank edges by |score| (CMD's curve) or by signed score (CPR's).
        selection: how each budget's circuit is chosen (`circuits.selection.strategies`).
        percentages: the budgets, % of all edges, ascending (default MIB's ten).
        protocol: `mib` (MIB's budgets and x values) or `pruned` (see the module docstring).
        ablation, batch_size: how each circuit is evaluated (`evaluate_many`).
        seed: for random selection; label: the curve's name (default the selection's).
    """

    absolute: bool = True
    selection: Selection | Selector = "top_n"
    percentages: tuple[float, ...] = MIB_PERCENTAGES
    protocol: CurveProtocol = "mib"
    ablation: Ablation = "patching"
    batch_size: int = 8
    seed: int = 0
    label: str | None = None

    def __post_init__(self) -> None:
        percentages = tuple(self.percentages)
        object.__setattr__(self, "percentages", percentages)
        if not percentages or sorted(percentages) != list(percentages):
            raise InputError("percentages must be a non-empty ascending sequence")
        if any(not 0 < p <= 100 for p in percentages):
            raise InputError(f"percentages must lie in (0, 100], got {list(percentages)}")
        if self.protocol not in PROTOCOLS:
            raise InputError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")


@uses_model
def faithfulness_curve(
    model: HookedModel,
    graph: Graph | SpanGraph,
    pairs: Pairs,
    metric: str | Metric | None = None,
    options: CurveOptions | None = None,
    *,
    reference: Pairs | None = None,
    spans: Spans | None = None,
    quiet: bool = False,
    **settings: Any,
) -> FaithfulnessCurve:
    """Faithfulness of circuits of `graph`'s best edges at each budget of `options` (`CurveOptions`; any
    of its fields may be given as a keyword instead), budgets and x values as its protocol says (see the
    module docstring). `reference`: the prompts of a mean ablation (default `pairs`).

    A `SpanGraph` (with `spans`, default the task's): budgets count its span and crossing edges together,
    circuits are `top_n` or `greedy` selections, and x is the budget's fraction (`mib`) or the fraction
    of edges left after pruning (`pruned`)."""
    options = with_settings(options or CurveOptions(), settings)
    fractions = [round(p / 100, 12) for p in options.percentages]  # MIB's literals (.001, ..., 1)
    if isinstance(graph, SpanGraph):
        return _span_curve(model, graph, pairs, metric, options, fractions, reference, spans, quiet)
    mib = options.protocol == "mib"
    weights = mib_edge_weights(graph) if mib else graph.valid.long()
    if mib and int(weights.max()) > 1:
        warnings.warn(
            f"MIB's protocol on a grouped-query model's grouped graph ({graph.spec.n_kv_heads} key/value "
            f"heads for {graph.spec.n_heads} query heads) approximates MIB's curve: it keeps or drops a "
            "key/value edge with all its copies. For MIB's numbers score Graph.from_model(model, "
            "ungrouped=True)",
            CircuitsWarning,
            stacklevel=3,
        )
    total = int(weights.sum())
    budgets = [int(f * total) if mib else round(f * total) for f in fractions]
    circuits = [select(graph, b, options.selection, options.absolute, options.seed, weights) for b in budgets]
    results = evaluate_many(
        model,
        circuits,
        pairs,
        metric,
        options.ablation,
        reference=reference,
        batch_size=options.batch_size,
        quiet=quiet,
    )
    return _curve(options, fractions, [c.n_in_graph for c in circuits], graph.n_edges, results)


def _span_curve(
    model: HookedModel,
    graph: SpanGraph,
    pairs: Pairs,
    metric: str | Metric | None,
    options: CurveOptions,
    fractions: list[float],
    reference: Pairs | None,
    spans: Spans | None,
    quiet: bool,
) -> FaithfulnessCurve:
    """`faithfulness_curve` of a position-aware graph."""
    if options.selection not in ("top_n", "greedy"):
        raise InputError(f"a SpanGraph's circuits are top_n or greedy selections, not {options.selection!r}")
    total = graph.n_edges
    mib = options.protocol == "mib"
    grow = graph.greedy if options.selection == "greedy" else graph.top_n
    circuits = [grow(int(f * total) if mib else round(f * total), options.absolute) for f in fractions]
    results = evaluate_many(
        model,
        circuits,
        pairs,
        metric,
        options.ablation,
        reference=reference,
        batch_size=options.batch_size,
        quiet=quiet,
        spans=spans,
    )
    return _curve(options, fractions, [c.n_in_graph for c in circuits], total, results)


def _curve(
    options: CurveOptions, fractions: list[float], sizes: list[int], total: int, results: list[Evaluation]
) -> FaithfulnessCurve:
    """The curve of circuits of `sizes` edges (after pruning, of `total`) evaluated as `results`; x is the
    budget's fraction (`mib`) or the fraction of edges kept (`pruned`)."""
    mib = options.protocol == "mib"
    points = [
        CurvePoint(p, n, f if mib else n / total, r.circuit, r.faithfulness)
        for p, f, n, r in zip(options.percentages, fractions, sizes, results)
    ]
    first = results[0]
    return FaithfulnessCurve(
        options.label or selection_name(options.selection),
        options.absolute,
        first.full,
        first.empty,
        points,
        first.full_per_example,
        first.empty_per_example,
        [r.per_example for r in results],
    )


@dataclass(frozen=True)
class MIBScores:
    cpr: float  # area under f, signed selection (higher is better)
    cmd: float  # area under |1 - f|, absolute selection (lower is better)
    signed: FaithfulnessCurve
    absolute: FaithfulnessCurve
    cpr_interval: Interval | None = None  # bootstrap over examples (`circuits.evaluation.intervals`)
    cmd_interval: Interval | None = None


def mib_scores(
    model: HookedModel,
    graph: Graph | SpanGraph,
    pairs: Pairs,
    metric: str | Metric | None = None,
    options: CurveOptions | None = None,
    *,
    reference: Pairs | None = None,
    spans: Spans | None = None,
    resamples: int = RESAMPLES,
    quiet: bool = False,
    **settings: Any,
) -> MIBScores:
    """CPR (signed selection) and CMD (absolute selection) of `graph`'s scores, with both curves (as
    `options` says, `absolute` aside; its fields may be given as keywords) and their 95% bootstrap
    intervals over the examples (`resamples` seeded draws; 0: none; another level or seed:
    `circuits.evaluation.intervals.curve_intervals` on the curves)."""
    options = with_settings(options or CurveOptions(), settings)
    signed, absolute = (
        faithfulness_curve(
            model,
            graph,
            pairs,
            metric,
            replace(options, absolute=by_size),
            reference=reference,
            spans=spans,
            quiet=quiet,
        )
        for by_size in (False, True)
    )
    cpr, cmd = None, None
    if resamples:
        cpr = curve_intervals(signed, resamples, LEVEL)[0]
        cmd = curve_intervals(absolute, resamples, LEVEL)[1]
    return MIBScores(signed.area_under, absolute.area_from_one, signed, absolute, cpr, cmd)
