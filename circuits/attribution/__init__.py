"""`attribute`: score every edge (or node) of a model's graph for a task, by a named method."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from circuits.attribution.heads import head_patching
from circuits.attribution.memory import FREE_SHARE, MemoryPlan, default_budget, estimate_bytes, plan_memory
from circuits.attribution.methods import DEFAULT_METHOD, METHODS, BatchResult, Job, MethodName, MethodSpec
from circuits.attribution.options import ScoringOptions
from circuits.data import PromptPairs, check_pairs
from circuits.distributed import is_main, sum_floats, sum_tensor
from circuits.errors import InputError, NumericalError
from circuits.graph import Graph
from circuits.metrics import Metric, get_metric, is_flat_at_clean, metric_name, reads_last_position
from circuits.models.hooked import HookedModel, uses_model
from circuits.models.relp import RelPBackward, RelPRules
from circuits.models.ungroup import model_for
from circuits.quadrature import warn_if_incomplete
from circuits.sources import AblationValues, SourceOutputs, source_means
from circuits.span_graph import SpanGraph
from circuits.spans import Spans
from circuits.task import Pairs

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Attribution",
    "Completeness",
    "MemoryPlan",
    "MethodName",
    "MethodSpec",
    "RelPRules",
    "ScoringOptions",
    "attribute",
    "estimate_bytes",
    "head_patching",
    "plan_memory",
    "source_means",
]


@dataclass(frozen=True)
class Completeness:
    """IG completeness over the data: sum_d (e_clean - e_corr) . g_input vs M(clean) - M(path end).

    The path ends at the corrupted run; for prompts of different lengths, at the clean prompt with its
    input patched at the aligned positions (`PromptPairs.alignment`), which is where IG's path ends there.
    """

    ig_sum: float  # mean over examples of the attributions' total
    metric_delta: float  # mean over examples of M(clean) - M(path end)
    abs_error: float  # mean over examples of |ig total - metric delta|
    aligned: bool = False  # prompts of different lengths: the path ends at the input patched

    @property
    def relative_error(self) -> float:
        return self.abs_error / max(abs(self.metric_delta), 1e-12)

    def __str__(self) -> str:
        end = "input patched" if self.aligned else "corrupted"
        return (
            f"completeness: IG total {self.ig_sum:.4f} vs M(clean)-M({end}) {self.metric_delta:.4f} "
            f"(mean |error| {self.abs_error:.4f}, relative {self.relative_error:.2%})"
        )


@dataclass(frozen=True)
class Attribution:
    """What `attribute` computed; scores are means over examples (fp32, independent of batch size)."""

    method: str
    level: str
    edge_scores: Tensor | None  # [n_sources, n_destinations]
    node_scores: Tensor | None  # [n_sources]
    n_examples: int
    metric_clean: float
    metric_corrupted: float | None
    completeness: Completeness | None
    options: ScoringOptions | None = None  # what ran: the given options as the memory plan fitted them
    # scored on a SpanGraph: the span names and the scores per span, [S, ...] (edge_scores, node_scores
    # are their sums over spans)
    span_names: tuple[str, ...] | None = None
    span_edge_scores: Tensor | None = None  # [S, n_sources, n_destinations]
    span_node_scores: Tensor | None = None  # [S, n_sources]
    # [S, S, n_sources, 2]: crossing edge (key / value span a, query span b, head, k / v), a <= b
    crossing_scores: Tensor | None = None


@uses_model
def attribute(
    model: HookedModel,
    graph: Graph | SpanGraph,
    pairs: Pairs,
    metric: str | Metric | None = None,
    method: MethodName | None = None,
    *,
    options: ScoringOptions | None = None,
    reference: Pairs | None = None,
    spans: Spans | None = None,
    quiet: bool = False,
    **settings: Any,
) -> Attribution:
    """Score the edges (or nodes) of `graph` for the behaviour in `pairs`, and write them into `graph`.

    A `SpanGraph` is scored per span of its schema: the prompts' spans are `spans`, or the task's own
    (`TaskPairs.spans`); the result's `span_edge_scores` / `span_node_scores` hold them, its `edge_scores`
    / `node_scores` their sums over spans.

    How: `options` (`ScoringOptions`: method, IG grid, ablation, level, batch size, memory budget, ...),
    with `method` and any of its fields given as keywords taking precedence, so both
    `attribute(model, graph, pairs, method="eap", ig_steps=5)` and `attribute(..., options=opts)` work.
    `reference`: the prompts whose clean runs give the mean ablation's values (default: `pairs`).

    Graph contract (as EAP-IG's `attribute`): the scores are written into `graph.scores` (edge level) and
    `graph.node_scores` (copies of the returned ones), the metric's name into `graph.metric` (kept in
    circuit files) and whether node scores are magnitudes into `graph.node_magnitudes` (AtP*'s GradDrop);
    nothing else of `graph` changes. The returned
    `Attribution` holds the same scores and never changes afterwards.
    Sign: as EAP-IG, scores estimate M(edge ablated) - M(clean) (negative = the edge helps the metric).
    """
    if method is not None:
        settings["method"] = method
    options = (options or ScoringOptions()).with_settings(**settings)
    span_graph = graph if isinstance(graph, SpanGraph) else None
    if span_graph is not None:
        graph = span_graph.graph
        spans = spans if spans is not None else getattr(pairs, "spans", None)
    elif spans is not None:
        raise InputError("spans score a SpanGraph (SpanGraph.from_model(model, spans)); this is a Graph")
    if not isinstance(graph, Graph):
        raise InputError(f"graph must be a Graph (Graph.from_model(model)), got {type(graph).__name__}")
    model = model_for(model, graph.spec)  # an ungrouped graph runs on the ungrouped twin
    graph.check_fits(model.spec)
    pairs = check_pairs(model, pairs)
    if span_graph is not None:
        pairs = span_graph.attach(spans, pairs)
    metric_fn = get_metric(pairs.metric_for(metric))
    if is_flat_at_clean(metric_fn) and options.spec.gradient_at_clean_only:
        raise InputError(
            f"{metric_name(pairs.metric_for(metric))} has a zero gradient at the clean run, the only point "
            f"where {options.method} takes one: its scores would be rounding noise (about 1e-10). Use exact "
            "patching (method='exact'), an integrated method (eap-ig-inputs), or a difference metric "
            "(logit_diff)"
        )
    options = _within_memory(model, graph, options, pairs, metric_fn, quiet)
    if reference is not None:
        reference = check_pairs(model, reference, "reference")
    n_spans = 0 if span_graph is None else len(span_graph.names)
    if span_graph is not None and reference is not None:
        reference = span_graph.attach(None, reference)  # a reference of the schema carries its spans
    ablated = (
        None
        if options.ablation == "patching"
        else source_means(model, graph, reference or pairs, options.ablation, options.batch_size, n_spans)
    )
    totals = _run_batches(model, graph, metric_fn, pairs, ablated, options, quiet, n_spans)
    result = _result(options, totals, len(pairs), model, pairs.aligned)
    name = metric_name(pairs.metric_for(metric))
    if span_graph is not None:
        result = _summed_over_spans(result, span_graph.names)
        if result.span_edge_scores is not None:
            span_graph.scores = result.span_edge_scores.clone()
        if result.span_node_scores is not None:
            span_graph.node_scores = result.span_node_scores.clone()
        if result.crossing_scores is not None:
            span_graph.crossing_scores = result.crossing_scores.clone()
        span_graph.metric = name
        return result
    if result.edge_scores is not None:
        graph.scores = result.edge_scores.clone()
    if result.node_scores is not None:
        graph.node_scores = result.node_scores.clone()
    graph.metric = name
    graph.node_magnitudes = options.method == "atp*" and options.level == "node"  # GradDrop's |.|
    return result


def _summed_over_spans(result: Attribution, names: tuple[str, ...]) -> Attribution:
    """`result`, whose scores are per span, with those as `span_*` and their sums over spans as scores."""
    edges, nodes = result.edge_scores, result.node_scores
    return replace(
        result,
        edge_scores=None if edges is None else edges.sum(0),
        node_scores=None if nodes is None else nodes.sum(0),
        span_names=names,
        span_edge_scores=edges,
        span_node_scores=nodes,
    )


def _within_memory(
    model: HookedModel, graph: Graph, options: ScoringOptions, pairs: PromptPairs, metric: Metric, quiet: bool
) -> ScoringOptions:
    """`options` with the batch size, rows per pass and recomputation that fit `max_memory`, or, when none
    is given, what the device has free (`memory.default_budget`, said on stderr when it changes them)."""
    budget = options.max_memory
    if budget is None:
        budget = default_budget(model)
        if budget is None:
            return options
    planned = options.with_settings(max_memory=budget)
    plan = plan_memory(model, graph, planned, pairs.n_positions, reads_last_position(metric, pairs))
    fitted = options.with_settings(
        batch_size=plan.batch_size, max_rows=plan.max_rows, recompute=options.recompute or plan.recompute
    )
    changed = (fitted.batch_size, fitted.max_rows, fitted.recompute) != (
        options.batch_size,
        options.max_rows,
        options.recompute,
    )
    if options.max_memory is None and changed and not quiet and is_main():
        tqdm.write(  # the progress output
            f"memory: no max_memory given, so {plan} to fit {budget:.1f} GiB ({FREE_SHARE:.0%} of what is "
            "free now, plus the model); max_memory sets another budget",
            file=sys.stderr,
        )
    return fitted


def _run_batches(
    model: HookedModel,
    graph: Graph,
    metric: Metric,
    pairs: PromptPairs,
    ablated: AblationValues | None,
    options: ScoringOptions,
    quiet: bool,
    n_spans: int = 0,
) -> dict[str, Tensor | float]:
    """The method's sums over this process's batches, summed over processes (split into `n_spans` spans
    when the pairs carry their spans)."""
    totals: dict[str, Tensor | float] = {}
    workspace: dict[str, Tensor] = {}
    outputs: dict[str, SourceOutputs] = {}
    backward = None if options.backward_rules is None else RelPBackward(model, options.backward_rules)
    desc = f"{options.method} ({options.level})"
    for where, batch in pairs.process_batches(options.batch_size, model.device, desc, quiet):
        job = Job(
            model,
            graph,
            metric,
            batch,
            ablated,
            options.level,
            options.ig_steps,
            options.quadrature,
            options.max_rows,
            workspace,
            where,
            backward,
            options.recompute,
            outputs,
            n_spans,
        )
        _accumulate(totals, options.spec.run(job))
    return _summed_over_processes(totals, model.device)


def _result(
    options: ScoringOptions, totals: dict[str, Tensor | float], n: int, model: HookedModel, aligned: bool
) -> Attribution:
    """The means over the `n` pairs; non-finite scores raise `NumericalError`."""
    edges = (totals["edges"] / n).float() if "edges" in totals else None  # type: ignore[operator, union-attr]
    nodes = (totals["nodes"] / n).float() if "nodes" in totals else None  # type: ignore[operator, union-attr]
    completeness = None
    if "ig_total" in totals:
        completeness = Completeness(
            float(totals["ig_total"]) / n,
            float(totals["delta"]) / n,
            float(totals["abs_error"]) / n,
            aligned,
        )
    result = Attribution(
        options.method,
        options.level,
        None if edges is None else edges.cpu(),  # type: ignore[union-attr]
        None if nodes is None else nodes.cpu(),  # type: ignore[union-attr]
        n,
        float(totals["metric_clean"]) / n,
        float(totals["metric_corrupted"]) / n if "metric_corrupted" in totals else None,
        completeness,
        options,
        crossing_scores=(totals["crossing"] / n).float() if "crossing" in totals else None,  # type: ignore[operator, union-attr]
    )
    if completeness is not None:
        advice = f"Use more ig_steps (now {options.ig_steps}) or quadrature='gauss-legendre'"
        warn_if_incomplete(completeness.relative_error, str(completeness), advice)
    for name, scores in (("edge", result.edge_scores), ("node", result.node_scores)):
        if scores is not None and not bool(scores.isfinite().all()):
            raise NumericalError(
                f"{int((~scores.isfinite()).sum())} {name} scores are NaN or infinite (the metric was "
                f"finite: the model's activations or gradients overflowed in {model.dtype}); try float32"
            )
    return result


def _summed_over_processes(
    totals: dict[str, Tensor | float], device: torch.device
) -> dict[str, Tensor | float]:
    """The totals of every process (`circuits.distributed`; one process: unchanged)."""
    summed: dict[str, Tensor | float] = {
        k: sum_tensor(v, device) for k, v in totals.items() if isinstance(v, Tensor)
    }
    summed |= sum_floats({k: v for k, v in totals.items() if not isinstance(v, Tensor)}, device)
    return summed


def _accumulate(totals: dict[str, Tensor | float], r: BatchResult) -> None:
    """Batch sums into `totals`; score tensors in float64, so the sum hardly depends on the batching."""

    def add(key: str, value: Tensor | float) -> None:
        totals[key] = totals[key] + value if key in totals else value  # type: ignore[operator]

    if r.edges is not None:
        add("edges", r.edges.detach().double().cpu())
    if r.nodes is not None:
        add("nodes", r.nodes.detach().double().cpu())
    if r.crossing is not None:
        add("crossing", r.crossing.detach().double().cpu())
    add("metric_clean", float(r.metric_clean.sum()))
    if r.metric_corrupted is not None:
        add("metric_corrupted", float(r.metric_corrupted.sum()))
    if r.ig_total is not None and r.metric_corrupted is not None:
        end = r.metric_corrupted if r.metric_path_end is None else r.metric_path_end
        delta = r.metric_clean - end.to(r.metric_clean.device)
        add("ig_total", float(r.ig_total.sum()))
        add("delta", float(delta.sum()))
        add("abs_error", float((r.ig_total.to(delta.device) - delta).abs().sum()))
