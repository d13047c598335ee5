"""`attribute`: score every edge (or node) of a model's graph for a task, by a named method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm import tqdm

from circuits.attribution.heads import head_patching
from circuits.attribution.memory import MemoryPlan, estimate_bytes, plan_memory
from circuits.attribution.methods import DEFAULT_METHOD, METHODS, BatchResult, Job, MethodName, MethodSpec
from circuits.data import PromptPairs, check_count, check_pairs
from circuits.distributed import is_main, shard_range, sum_floats, sum_tensor
from circuits.errors import InputError, NumericalError
from circuits.graph import Graph
from circuits.metrics import Metric, get_metric, reads_last_position
from circuits.models.hooked import HookedModel, uses_model
from circuits.models.relp import RelPBackward, RelPRules
from circuits.quadrature import EDGE_QUADRATURES, Quadrature, check_rule, check_steps
from circuits.sources import ABLATIONS, Ablation, SourceOutputs, source_means

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Attribution",
    "Completeness",
    "MemoryPlan",
    "MethodName",
    "MethodSpec",
    "RelPRules",
    "attribute",
    "estimate_bytes",
    "head_patching",
    "plan_memory",
    "source_means",
]


@dataclass
class Completeness:
    """IG completeness over the data: sum_d (e_clean - e_corr) . g_input vs M(clean) - M(corrupted)."""

    ig_sum: float  # mean over examples of the attributions' total
    metric_delta: float  # mean over examples of M(clean) - M(corrupted)
    abs_error: float  # mean over examples of |ig total - metric delta|

    @property
    def relative_error(self) -> float:
        return self.abs_error / max(abs(self.metric_delta), 1e-12)

    def __str__(self) -> str:
        return (
            f"completeness: IG total {self.ig_sum:.4f} vs M(clean)-M(corrupted) {self.metric_delta:.4f} "
            f"(mean |error| {self.abs_error:.4f}, relative {self.relative_error:.2%})"
        )


@dataclass
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


@uses_model
def attribute(
    model: HookedModel,
    graph: Graph,
    pairs: PromptPairs,
    metric: str | Metric = "logit_diff",
    method: MethodName = DEFAULT_METHOD,
    *,
    ig_steps: int = 5,
    quadrature: Quadrature = "left",
    ablation: Ablation = "patching",
    reference: PromptPairs | None = None,
    batch_size: int = 8,
    level: Literal["edge", "node"] = "edge",
    max_rows: int = 64,
    max_memory: float | None = None,
    recompute: bool = False,
    rules: RelPRules | None = None,
    quiet: bool = False,
) -> Attribution:
    """Score the edges (or nodes) of `graph` for the behaviour in `pairs`; fills `graph.scores`.

    Args:
        method: one of `eap`, `eap-ig-inputs`, `eap-ig-activations`, `clean-corrupted`, `relp`, `atp*`,
            `exact`.
        ig_steps, quadrature: the IG grid (`left` = EAP-IG's k/m, k=0..m-1; `midpoint`, `trapezoid`,
            `gauss-legendre`).
        ablation: what an edge carries when removed: the corrupted run's output (`patching`), the mean
            over `reference`'s clean prompts (`mean`, per position when all lengths agree) or zero.
        level: `edge` fills `graph.scores` (and `graph.node_scores` for gradient methods); `node` fills
            `graph.node_scores` only.
        max_rows: rows per forward pass when IG steps / patched copies are stacked in the batch.
        max_memory: a budget in GiB for the weights, buffers and autograd activations of the call: the
            fastest `batch_size` / `max_rows` / `recompute` at most as large as given that the memory model
            (`circuits.attribution.memory`) fits within it; the scores do not change.
        recompute: keep one block's activations at a time in the backward passes and recompute each block
            when the backward pass reaches it (exact; one more forward pass of time, little at long
            prompts); gradient methods other than atp*.
        rules: RelP's backward rules (`RelPRules`: LN, identity, half on and CP off by default, as the
            paper's); `relp` uses the defaults unless given, and the other gradient methods take them too
            (e.g. `eap-ig-inputs` with RelP's backward).
    Sign: as EAP-IG, scores estimate M(edge ablated) - M(clean) (negative = the edge helps the metric).
    """
    if not isinstance(method, str) or method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    spec = METHODS[method]
    check_rule(quadrature)
    if quadrature == "idgi":
        raise InputError(
            "IDGI attributes one integrated tensor (use it with token_ig or neuron_ig); there is no "
            "IDGI edge score: its shares follow the gradient alone (features that do not move get credit, "
            "a layer's heads, which share one output gradient, get equal shares) and no split of a step "
            "keeps every cut of the graph exact (docs/design.md, section 4); choose one of "
            f"{', '.join(EDGE_QUADRATURES)}"
        )
    if ablation not in ABLATIONS:
        raise InputError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
    if spec.needs_corrupted and ablation != "patching":
        raise InputError(
            f"{method} interpolates between clean and corrupted prompts; it needs ablation='patching'"
        )
    if level not in ("edge", "node"):
        raise InputError(f"level must be 'edge' or 'node', got {level!r}")
    if rules is not None and not isinstance(rules, RelPRules):
        raise InputError(f"rules must be a RelPRules, got {type(rules).__name__}")
    if rules is not None and spec.backward in ("none", "own"):
        why = "takes no backward pass" if spec.backward == "none" else "has a backward pass of its own"
        raise InputError(f"{method} {why}, so RelP's rules do not apply to it")
    if rules is None and spec.backward == "relp":
        rules = RelPRules()
    check_steps(ig_steps)
    check_count(batch_size, "batch_size")
    check_count(max_rows, "max_rows")
    if recompute and not spec.recomputable:
        recomputable = [name for name, other in METHODS.items() if other.recomputable]
        raise InputError(
            f"{method} cannot recompute blocks in its backward pass (choose one of {', '.join(recomputable)})"
        )
    if not isinstance(graph, Graph):
        raise InputError(f"graph must be a Graph (Graph.from_model(model)), got {type(graph).__name__}")
    graph.check_fits(model.spec)
    metric_fn = get_metric(metric)
    check_pairs(model, pairs)
    if max_memory is not None:
        plan = plan_memory(
            model,
            graph,
            spec,
            max_memory,
            n_positions=pairs.n_positions,
            batch_size=batch_size,
            max_rows=max_rows,
            steps=ig_steps,
            level=level,
            last_position=reads_last_position(metric_fn),
        )
        batch_size, max_rows, recompute = plan.batch_size, plan.max_rows, recompute or plan.recompute
    if reference is not None:
        check_pairs(model, reference, "reference")
    backward = None if rules is None else RelPBackward(model, rules)
    ablated = (
        None
        if ablation == "patching"
        else source_means(model, graph, reference or pairs, ablation, batch_size, pairs.n_positions)
    )

    totals: dict[str, Tensor | float] = {}
    mine = shard_range(len(pairs), model.device)  # all of them, unless under torchrun
    local = pairs[mine.start : mine.stop]
    bar = tqdm(total=len(local), desc=f"{method} ({level})", unit="pair", disable=quiet or not is_main())
    workspace: dict[str, Tensor] = {}
    outputs: dict[str, SourceOutputs] = {}
    for i, batch in enumerate(local.batches(batch_size)):
        first = mine.start + i * batch_size
        where = f"batch {i} (pairs {first}-{first + len(batch) - 1})"
        job = Job(
            model,
            graph,
            metric_fn,
            batch,
            ablated,
            level,
            ig_steps,
            quadrature,
            max_rows,
            workspace,
            where,
            backward,
            recompute,
            outputs,
        )
        _accumulate(totals, spec.run(job))
        bar.update(len(batch))
    bar.close()
    totals = _summed_over_processes(totals, model.device)

    n = len(pairs)
    edges = (totals["edges"] / n).float() if "edges" in totals else None  # type: ignore[operator, union-attr]
    nodes = (totals["nodes"] / n).float() if "nodes" in totals else None  # type: ignore[operator, union-attr]
    completeness = None
    if "ig_total" in totals:
        completeness = Completeness(
            float(totals["ig_total"]) / n, float(totals["delta"]) / n, float(totals["abs_error"]) / n
        )
    result = Attribution(
        method,
        level,
        None if edges is None else edges.cpu(),  # type: ignore[union-attr]
        None if nodes is None else nodes.cpu(),  # type: ignore[union-attr]
        n,
        float(totals["metric_clean"]) / n,
        float(totals["metric_corrupted"]) / n if "metric_corrupted" in totals else None,
        completeness,
    )
    for name, scores in (("edge", result.edge_scores), ("node", result.node_scores)):
        if scores is not None and not bool(scores.isfinite().all()):
            raise NumericalError(
                f"{int((~scores.isfinite()).sum())} {name} scores are NaN or infinite (the metric was "
                f"finite: the model's activations or gradients overflowed in {model.dtype}); try float32"
            )
    if result.edge_scores is not None:
        graph.scores = result.edge_scores.clone()
    if result.node_scores is not None:
        graph.node_scores = result.node_scores.clone()
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
    add("metric_clean", float(r.metric_clean.sum()))
    if r.metric_corrupted is not None:
        add("metric_corrupted", float(r.metric_corrupted.sum()))
    if r.ig_total is not None and r.metric_corrupted is not None:
        delta = r.metric_clean - r.metric_corrupted
        add("ig_total", float(r.ig_total.sum()))
        add("delta", float(delta.sum()))
        add("abs_error", float((r.ig_total.to(delta.device) - delta).abs().sum()))
