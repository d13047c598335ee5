"""Faithfulness of circuits: run the model with every edge outside a circuit ablated (the protocol of
EAP-IG, Hanna et al. 2024, arXiv 2403.17806, and MIB, Mueller et al. 2025, arXiv 2504.13151).

A position-aware circuit (`SpanGraph`) has every span edge outside it ablated at its span's positions and
every crossing edge outside it ablated inside its head's attention
(`intervention.forward_with_span_ablation`).

f(C) = (M(C) - M(empty)) / (M(full) - M(empty)), a ratio of dataset means. The callers' graphs are never
modified: the ablation masks are computed from them. Several circuits are evaluated batch by batch, so the
clean, ablated and empty-circuit passes are shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.attribution.crossing import ablated_head_inputs, clean_attention
from circuits.data import PromptPairs, check_count, check_pairs
from circuits.distributed import gather_rows
from circuits.errors import InputError, NumericalError
from circuits.graph import Graph
from circuits.intervention import forward_with_ablation, forward_with_span_ablation
from circuits.metrics import Metric, check_values, get_metric
from circuits.models.hooked import HookedModel, uses_model
from circuits.models.ungroup import model_for
from circuits.sources import (
    ABLATIONS,
    Ablation,
    AblationValues,
    SourceOutputs,
    source_hooks,
    source_means,
    source_placement,
)
from circuits.span_graph import SpanGraph
from circuits.spans import Spans
from circuits.task import Pairs


@dataclass(frozen=True)
class Evaluation:
    per_example: Tensor  # [N] metric with the circuit alone
    circuit: float  # mean M(circuit)
    full: float  # mean M(full model)
    empty: float  # mean M(every edge ablated)
    full_per_example: Tensor | None = None  # [N] M(full model) per example (for bootstrap intervals)
    empty_per_example: Tensor | None = None  # [N] M(empty circuit) per example

    @property
    def faithfulness(self) -> float:
        """(M(circuit) - M(empty)) / (M(full) - M(empty)); `NumericalError` when the denominator is 0."""
        if self.full == self.empty:
            raise NumericalError(
                f"faithfulness is undefined: the full model and the empty circuit score the same "
                f"(M = {self.full:.6g}), so nothing separates the clean and the ablated runs. Check that the "
                "corrupted prompts change the metric (baseline) and that the metric reads the logits"
            )
        return (self.circuit - self.empty) / (self.full - self.empty)


@uses_model
def evaluate(
    model: HookedModel,
    circuit: Graph | SpanGraph,
    pairs: Pairs,
    metric: str | Metric | None = None,
    ablation: Ablation = "patching",
    *,
    reference: Pairs | None = None,
    complement: bool = False,
    batch_size: int = 8,
    quiet: bool = True,
    spans: Spans | None = None,
) -> Evaluation:
    """Metric of the circuit (edges with `in_graph`), the full model and the empty circuit.

    A `SpanGraph` circuit is evaluated on `pairs` split by `spans` (default: the task's own spans).

    ablation: what a removed edge carries: the corrupted run's output (`patching`), the source's mean
        output over `reference`'s clean prompts (`mean`, per position when lengths agree) or zero.
    complement: ablate the circuit's edges instead, keeping everything else.
    """
    return evaluate_many(
        model,
        [circuit],
        pairs,
        metric,
        ablation,
        reference=reference,
        complement=complement,
        batch_size=batch_size,
        quiet=quiet,
        spans=spans,
    )[0]


@uses_model
def evaluate_many(
    model: HookedModel,
    circuits: Sequence[Graph | SpanGraph],
    pairs: Pairs,
    metric: str | Metric | None = None,
    ablation: Ablation = "patching",
    *,
    reference: Pairs | None = None,
    complement: bool = False,
    batch_size: int = 8,
    quiet: bool = True,
    spans: Spans | None = None,
) -> list[Evaluation]:
    """`evaluate` for several circuits of one model, sharing the clean, ablated and empty passes."""
    if not circuits:
        raise InputError("no circuits to evaluate")
    if ablation not in ABLATIONS:
        raise InputError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
    check_count(batch_size, "batch_size")
    span_graphs = [c for c in circuits if isinstance(c, SpanGraph)]
    if span_graphs:
        if len(span_graphs) < len(circuits):
            raise InputError("evaluate position-aware circuits (SpanGraph) apart from Graph circuits")
        return _evaluate_spans(
            model, span_graphs, pairs, spans, metric, ablation, reference, batch_size, quiet, complement
        )
    graphs = [c for c in circuits if isinstance(c, Graph)]
    if len(graphs) < len(circuits):
        other = next(c for c in circuits if not isinstance(c, Graph))
        raise InputError(f"circuits must be Graphs, got {type(other).__name__}")
    circuits = graphs
    model = model_for(model, circuits[0].spec)  # ungrouped circuits run on the ungrouped twin
    for circuit in circuits:
        circuit.check_fits(model.spec)
    pairs = check_pairs(model, pairs)
    if reference is not None:
        reference = check_pairs(model, reference, "reference")
    graph = circuits[0]
    fn = get_metric(pairs.metric_for(metric))
    ablate = [_ablation_mask(c, complement) for c in circuits]
    means = (
        None
        if ablation == "patching"
        else source_means(model, graph, reference or pairs, ablation, batch_size)
    )
    values: list[list[Tensor]] = [[] for _ in circuits]
    full: list[Tensor] = []
    empty: list[Tensor] = []
    desc = f"evaluating {len(circuits)} circuit(s)"
    for where, batch in pairs.process_batches(batch_size, model.device, desc, quiet):

        def measure(logits: Tensor, clean: Tensor, batch: PromptPairs = batch, where: str = where) -> Tensor:
            return check_values(fn(logits, batch, clean), len(batch), where)

        ids, mask = batch.clean.to(model.device), batch.attention_mask.to(model.device)
        ablated, corrupted_logits, clean_logits = ablated_outputs(model, graph, batch, means)
        # with patching of prompts of one length, ablating every edge is the corrupted run itself (tested),
        # so its logits are reused; prompts of different lengths keep unmatched positions clean
        nothing = (
            corrupted_logits
            if corrupted_logits is not None and not batch.aligned
            else forward_with_ablation(model, graph, ids, mask, ablated, graph.valid)
        )
        full.append(measure(clean_logits, clean_logits).cpu())
        empty.append(measure(nothing, clean_logits).cpu())
        for i, edges in enumerate(ablate):
            patched = forward_with_ablation(model, graph, ids, mask, ablated, edges)
            values[i].append(measure(patched, clean_logits).cpu())
    return _evaluations(values, full, empty, model.device)


def _evaluations(
    values: list[list[Tensor]], full: list[Tensor], empty: list[Tensor], device: torch.device
) -> list[Evaluation]:
    """One `Evaluation` per circuit from the per-batch metrics of the circuits, the full model and the
    empty circuit (gathered over processes)."""
    full_all, empty_all = (gather_rows(torch.cat(v), device) for v in (full, empty))
    results = []
    for per_batch in values:
        per_example = gather_rows(torch.cat(per_batch), device)
        full_mean, empty_mean = float(full_all.double().mean()), float(empty_all.double().mean())
        results.append(
            Evaluation(per_example, float(per_example.mean()), full_mean, empty_mean, full_all, empty_all)
        )
    return results


def _ablation_mask(circuit: Graph, complement: bool) -> Tensor:
    keep = circuit.in_graph & circuit.valid
    return keep if complement else circuit.valid & ~keep


def ablated_outputs(
    model: HookedModel, graph: Graph, batch: PromptPairs, means: AblationValues | None
) -> tuple[SourceOutputs, Tensor | None, Tensor]:
    """Corrupted source outputs [b, P, n_sources, d] at the clean positions they correspond to (each kept
    beside the layer that writes it) and the corrupted logits (patching), or the means / zeros at every
    position and None; and the clean logits (the clean outputs of prompts of different lengths are
    recorded in that same pass)."""
    clean_ids, clean_mask = batch.clean.to(model.device), batch.attention_mask.to(model.device)
    placement = source_placement(model, graph)
    clean = SourceOutputs.empty(graph, len(batch), batch.n_positions, placement) if batch.aligned else None
    with torch.no_grad(), model.hooks([] if clean is None else source_hooks(model, graph, clean)):
        clean_logits = model(clean_ids, clean_mask)
    if means is not None:
        return SourceOutputs.of(means.for_pairs(batch)), None, clean_logits
    acts = SourceOutputs.empty(graph, len(batch), batch.n_positions, placement)
    with torch.no_grad(), model.hooks(source_hooks(model, graph, acts)):
        logits = model(batch.corrupted.to(model.device), batch.corrupted_mask.to(model.device))
    if clean is not None:
        acts.align_(batch, clean)
    return acts, logits, clean_logits


def _evaluate_spans(
    model: HookedModel,
    circuits: Sequence[SpanGraph],
    pairs: Pairs,
    spans: Spans | None,
    metric: str | Metric | None,
    ablation: Ablation,
    reference: Pairs | None,
    batch_size: int,
    quiet: bool,
    complement: bool = False,
) -> list[Evaluation]:
    """The metric of each position-aware circuit (its `in_graph` span edges and `in_crossing` crossing
    edges), of the full model and of the empty circuit, on `pairs` split by `spans` (default: the task's).

    ablation: what a removed edge carries: the corrupted run's (`patching`), the source's mean output over
        `reference`'s clean prompts (`mean`, per position when lengths agree) or zero; a removed crossing
        edge carries the key (value) input computed from the residual stream with every source so ablated.
    """
    for circuit in circuits:
        if not isinstance(circuit, SpanGraph):
            raise InputError(f"circuits must be SpanGraphs, got {type(circuit).__name__}")
        if circuit.names != circuits[0].names:
            raise InputError("the circuits follow different span schemas")
    first = circuits[0]
    graph = first.graph
    graph.check_fits(model.spec)
    spans = spans if spans is not None else getattr(pairs, "spans", None)
    pairs = first.attach(spans, check_pairs(model, pairs))
    if reference is not None:
        reference = check_pairs(model, reference, "reference")
    fn = get_metric(pairs.metric_for(metric))
    if reference is not None:
        reference = first.attach(None, reference)
    n_spans = len(first.names)
    means = (
        None
        if ablation == "patching"
        else source_means(model, graph, reference or pairs, ablation, batch_size, n_spans)
    )
    masks = [
        (
            first.valid & (c.in_graph if complement else ~c.in_graph),
            first.crossing_valid & (c.in_crossing if complement else ~c.in_crossing),
        )
        for c in circuits
    ]
    nothing = (first.valid, first.crossing_valid)
    values: list[list[Tensor]] = [[] for _ in circuits]
    full: list[Tensor] = []
    empty: list[Tensor] = []
    desc = f"evaluating {len(circuits)} position-aware circuit(s)"
    for where, batch in pairs.process_batches(batch_size, model.device, desc, quiet):
        ids, mask = batch.clean.to(model.device), batch.attention_mask.to(model.device)
        assert batch.span_index is not None
        span_index = batch.span_index.to(model.device)
        ablated, _, clean_logits = ablated_outputs(model, graph, batch, means)
        inputs = _ablated_inputs(model, first, batch, ablated)

        full.append(check_values(fn(clean_logits, batch, clean_logits), len(batch), where).cpu())
        for i, (span_mask, crossing_mask) in enumerate([nothing, *masks]):
            logits = forward_with_span_ablation(
                model, graph, ids, mask, ablated, span_mask, span_index, crossing_mask, inputs
            )
            measured = check_values(fn(logits, batch, clean_logits), len(batch), where).cpu()
            (empty if i == 0 else values[i - 1]).append(measured)
    return _evaluations(values, full, empty, model.device)


def _ablated_inputs(
    model: HookedModel, circuit: SpanGraph, batch: PromptPairs, ablated: SourceOutputs
) -> dict[tuple[int, str], Tensor]:
    """Every head layer's key / value inputs from the fully ablated residual stream (crossing edges)."""
    graph = circuit.graph
    ids, mask = batch.clean.to(model.device), batch.attention_mask.to(model.device)
    clean = SourceOutputs.empty(graph, len(batch), batch.n_positions, source_placement(model, graph))
    with torch.no_grad(), model.hooks(source_hooks(model, graph, clean)):
        model(ids, mask)
    delta = SourceOutputs.empty(graph, len(batch), batch.n_positions, source_placement(model, graph))
    delta.difference(SourceOutputs.of(ablated).map(lambda t: t.expand(len(batch), *t.shape[1:])), clean)
    resid, _ = clean_attention(model, graph, ids, mask)
    return ablated_head_inputs(model, graph, resid, delta)
