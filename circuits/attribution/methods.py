"""The scoring methods, one function each, registered by name (EAP: Syed et al. 2023, arXiv 2310.10348;
EAP-IG: Hanna et al. 2024, arXiv 2403.17806).

Every method accumulates, over batches, sums over examples of
    edge u->v:  delta_u . g_v        node u:  delta_u . g_u
with delta_u = a_u(ablated) - a_u(clean) (ablated = corrupted for patching) and g the gradient of the
per-example metric at v's input (u's output), taken where the method says:
- eap:                 at the clean input (1 forward + 1 forward/backward per batch);
- eap-ig-inputs:       averaged over inputs e_corr + alpha (e_clean - e_corr), alpha on a quadrature grid
                       (steps stacked in the batch: 2 forwards + `steps` forward/backward rows per batch);
- eap-ig-activations:  for the sources of one group (input, layer l's heads, layer l's MLP), averaged over
                       that group's outputs interpolated between ablated and clean, the rest of the model
                       clean (steps x (2 n_layers + 1) forward/backward rows per batch);
- clean-corrupted:     mean of the gradients at the clean and the corrupted inputs;
- atp*:                eap with AtP*'s corrections (Kramar et al. 2024, arXiv 2403.00745;
                       `circuits.attribution.qk_fix`): q/k edges with the attention softmax recomputed
                       exactly (QK fix); at node level, also GradDrop (L more backward passes, |.|);
- relp:                eap with the backward pass following RelP's rules (Jafari et al. 2025, arXiv
                       2508.21258; `circuits.models.relp`); the gradient methods above take the same
                       rules through `attribute(..., rules=...)`;
- exact:               M(model with only that edge / node ablated) - M(clean), batched edge by edge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from circuits.attribution.crossing import exact_hooks, gradient_scores, head_output_changes, head_sites
from circuits.attribution.qk_fix import QKCapture, qk_corrections
from circuits.attribution.recorder import ScoreRecorder
from circuits.data import PromptPairs
from circuits.errors import InputError
from circuits.graph import Graph
from circuits.intervention import forward_with_ablation, forward_with_node_ablation
from circuits.metrics import Metric, check_values, reads_last_position
from circuits.models.hooked import HookedModel, HookFn
from circuits.models.recompute import recomputed_blocks
from circuits.models.relp import RelPBackward
from circuits.models.wiring import SourceSite, wiring
from circuits.quadrature import Quadrature, quadrature
from circuits.sources import AblationValues, SourceOutputs, source_hooks, source_placement
from circuits.span_graph import crossing_valid


@dataclass
class Job:
    """Everything a method needs for one batch."""

    model: HookedModel
    graph: Graph
    metric: Metric
    pairs: PromptPairs
    ablated: AblationValues | None  # mean / zero ablation values, None for patching
    level: str  # "edge" or "node"
    steps: int
    quadrature: Quadrature
    max_rows: int
    workspace: dict[str, Tensor] = field(default_factory=dict)  # buffers reused from batch to batch
    where: str = "the batch"  # which batch and pairs, for error messages
    rules: RelPBackward | None = None  # RelP's modified backward, if the method runs with it
    recompute: bool = False  # checkpoint the blocks of passes with gradients (`models.recompute`)
    outputs: dict[str, SourceOutputs] = field(default_factory=dict)  # source outputs reused likewise
    n_spans: int = 0  # spans the scores are split into when the pairs carry a span index


@dataclass
class BatchResult:
    """Sums over the batch's examples."""

    edges: Tensor | None  # [n_sources, n_destinations]
    nodes: Tensor | None  # [n_sources]
    metric_clean: Tensor  # [b] per-example metric on the clean prompts
    metric_corrupted: Tensor | None  # [b] on the corrupted prompts (patching only)
    ig_total: Tensor | None  # [b] sum_d delta_input . g_input (completeness), IG-inputs only
    # [b] the metric where IG's path ends when that is not the corrupted run: for prompts of different
    # lengths, the clean prompts with the input patched (aligned); completeness compares with it
    metric_path_end: Tensor | None = None
    # per span: crossing-edge scores [S, S, n_sources, 2] (key / value span, query span, head, k / v)
    crossing: Tensor | None = None


Method = Callable[[Job], BatchResult]
# The registry's keys (METHODS), spelled out for type checkers; tests/attribution hold the two equal.
MethodName = Literal["eap", "eap-ig-inputs", "eap-ig-activations", "clean-corrupted", "relp", "atp*", "exact"]
DEFAULT_METHOD: MethodName = "eap-ig-inputs"  # of `attribute`, `discover`, the bootstrap and the CLI
PassCount = Callable[[int, int], tuple[int, int]]  # (IG steps, layers) -> (forwards, forward+backwards)
Backward = Literal["plain", "relp", "own", "none"]
Rows = Literal["batch", "clean and corrupted", "IG steps", "units"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered scoring method and the facts the API, the CLI, the memory planner and the benchmark
    read from it."""

    name: MethodName
    run: Method
    needs_corrupted: bool = False  # interpolates towards the corrupted prompts itself: patching only
    uses_ig_steps: bool = False
    passes: PassCount | None = None  # plain passes per batch it costs at best (None: one per edge / node)
    backward: Backward = "plain"  # "relp": RelP's rules by default; "own": a fixed backward
    buffers: int = 1  # source-output buffers [n_sources, b, P, d] it keeps for a batch
    recomputable: bool = True  # its backward passes can recompute blocks (`models.recompute`)
    rows: Rows = "batch"  # what its largest pass stacks: the batch, both sides, IG steps, ablated units
    gradient_at_clean_only: bool = False  # takes the metric's gradient at the clean run alone (EAP's kind)

    def pass_count(self, steps: int, n_layers: int) -> tuple[int, int] | None:
        return None if self.passes is None else self.passes(steps, n_layers)


METHODS: dict[str, MethodSpec] = {}


def register(name: MethodName, **facts: Any) -> Callable[[Method], Method]:
    """Add the decorated function to `METHODS` under `name`, with `facts` (`MethodSpec`'s fields)."""

    def add(fn: Method) -> Method:
        if name in METHODS:
            raise InputError(f"method {name!r} registered twice")
        METHODS[name] = MethodSpec(name, fn, **facts)
        return fn

    return add


# ------------------------------------------------------------------------------------------- helpers
def _acts(job: Job, rows: int, role: str) -> SourceOutputs:
    """Uninitialised source outputs [rows, P, n_sources, d] (source-major storage) for `role`, each source's
    beside the layer that writes it.

    Buffers are kept in the job's workspace and reused by the next batch of the same shape: fresh ones
    cost a page fault per 4 KiB on first touch, a sizeable part of a pass at these sizes.
    """
    graph, n_pos = job.graph, job.pairs.n_positions
    placement = source_placement(job.model, graph)
    cached = job.outputs.get(role)
    if (
        cached is None
        or cached.shape != (rows, n_pos, graph.n_sources, graph.spec.d_model)
        or cached.placement != placement
    ):
        cached = SourceOutputs.empty(graph, rows, n_pos, placement)
        job.outputs[role] = cached
    return cached


def _node_totals(edges: Tensor | None, nodes: Tensor) -> Tensor:
    """[n_sources] node scores summed over the batch ([S, n_sources] per span).

    At edge level they are the edge scores summed over destinations: every read of the residual stream
    is a destination, so a source's output gradient is the sum of its destinations' input gradients.
    """
    return edges.sum(-1) if edges is not None else nodes.sum(0)


def _n_spans(job: Job) -> int | None:
    """How many spans the batch's scores are split into (None: positions summed)."""
    return None if job.pairs.span_index is None or not job.n_spans else job.n_spans


def _accumulators(job: Job) -> tuple[Tensor | None, Tensor]:
    """Zeroed edge sums [n_sources, n_destinations] (edge level only) and per-example node scores
    [b, n_sources]; split by span, [S, n_sources, n_destinations] and (node level) [b, S, n_sources]."""
    device, graph, spans = job.model.device, job.graph, _n_spans(job)
    per_span = () if spans is None else (spans,)
    edges = None
    if job.level == "edge":
        edges = torch.zeros(*per_span, graph.n_sources, graph.n_destinations, device=device)
    nodes_per_span = per_span if edges is None else ()
    return edges, torch.zeros(len(job.pairs), *nodes_per_span, graph.n_sources, device=device)


def _input_totals(nodes: Tensor) -> Tensor:
    """[b] the input node's scores, summed over spans."""
    return nodes[:, 0] if nodes.dim() == 2 else nodes[:, :, 0].sum(1)


def _difference(job: Job, ablated: SourceOutputs, clean: SourceOutputs) -> SourceOutputs:
    """ablated - clean, written into a source-major buffer (what the score matmuls want)."""
    return _acts(job, clean.shape[0], "delta").difference(ablated, clean)


def _run(
    job: Job, ids: Tensor, hooks: list[tuple[str, HookFn]], grad: bool, pairs: PromptPairs | None = None
) -> Tensor:
    """Logits of rows `ids` (whole batches of `pairs`' clean prompts, default the job's, under their mask):
    [rows, P, d_vocab], or [rows, 1, d_vocab] at the read positions when the metric reads nothing else."""
    pairs = job.pairs if pairs is None else pairs
    mask = pairs.attention_mask.to(ids.device)
    mask = mask.repeat(ids.shape[0] // mask.shape[0], 1)
    if reads_last_position(job.metric, pairs):
        hooks = [*hooks, (job.model.unembed_in_hook, _at_last_positions(pairs.read_positions))]
    recomputed = recomputed_blocks(job.model) if grad and job.recompute else nullcontext()
    with torch.set_grad_enabled(grad), job.model.hooks(hooks), recomputed:
        return job.model(ids, mask)


def _at_last_positions(positions: Tensor) -> HookFn:
    """Unembedding-input hook keeping each row's read position [b] (rows: repeats of the batch)."""

    def keep(x: Tensor) -> Tensor:
        last = positions.to(x.device).repeat(x.shape[0] // positions.shape[0])
        return x[torch.arange(x.shape[0], device=x.device), last][:, None]

    return keep


def _with_rules(job: Job, hooks: list[tuple[str, HookFn]]) -> list[tuple[str, HookFn]]:
    """`hooks` and RelP's rule hooks for one forward pass around them (none without rules)."""
    return hooks if job.rules is None else job.rules.around(hooks)


def _recorder(
    job: Job,
    weights: Tensor,
    edges: Tensor | None,
    nodes: Tensor,
    delta: SourceOutputs | None = None,
    sources: slice = slice(None),
    output_grads: dict[int, Tensor] | None = None,
) -> ScoreRecorder:
    """The score recorder, its norm pull-back matching the model's backward (RelP's LN rule); with
    `output_grads`, also keeping the gradients at the heads' outputs that crossing edges are scored with."""
    frozen = job.rules is not None and job.rules.rules.ln
    return ScoreRecorder(
        job.model,
        job.graph,
        weights,
        edges,
        nodes,
        delta,
        sources,
        frozen,
        workspace=job.workspace,
        span_index=None if _n_spans(job) is None else job.pairs.span_index,
        output_grads=output_grads,
    )


def _output_grads(job: Job) -> dict[int, Tensor] | None:
    """Where the recorders keep the gradients at the heads' outputs, when crossing edges are scored."""
    return None if _n_spans(job) is None else {}


def _crossing(job: Job, delta: SourceOutputs, output_grads: dict[int, Tensor] | None) -> Tensor | None:
    """PEAP's crossing-edge scores [S, S, n_sources, 2] of the batch (None without spans): each head's
    output recomputed exactly with one span's keys / values ablated, dotted with the method's gradient
    there (`attribution.crossing`)."""
    pairs, span_index = job.pairs, job.pairs.span_index
    if output_grads is None or span_index is None:
        return None
    changes = head_output_changes(
        job.model,
        job.graph,
        pairs.clean.to(job.model.device),
        pairs.attention_mask.to(job.model.device),
        span_index.to(job.model.device),
        job.n_spans,
        delta,
        job.max_rows,
    )
    return gradient_scores(job.model, job.graph, changes, output_grads, span_index, job.n_spans)


def _at_span(job: Job, delta: SourceOutputs, positions: Tensor) -> SourceOutputs:
    """`delta` zeroed outside `positions` (bool [b, P]), in the job's one buffer for it (overwritten by the
    next call: use it before)."""
    out = _acts(job, delta.shape[0], "span delta")
    for (_, target), (_, source) in zip(out.shards, delta.shards, strict=True):
        keep = positions[:, : source.shape[1], None, None].to(source.device, source.dtype)
        torch.mul(source, keep, out=target)
    return out


def _grad_leaf(x: Tensor) -> Tensor:
    """Input hook making the embeddings a leaf that requires grad (the parameters are frozen)."""
    return x.detach().requires_grad_(True)


def _forward_sources(
    job: Job, ids: Tensor, role: str, pairs: PromptPairs | None = None
) -> tuple[SourceOutputs, Tensor]:
    """No-grad forward recording source outputs; returns (activations [b, P, n_src, d], logits)."""
    acts = _acts(job, ids.shape[0], role)
    logits = _run(job, ids, source_hooks(job.model, job.graph, acts), grad=False, pairs=pairs)
    return acts, logits


def _ablated_acts(job: Job, clean: SourceOutputs | None = None) -> tuple[SourceOutputs, Tensor | None]:
    """Ablated source outputs [b, P, n_src, d] in the "delta" buffer and, for patching, the corrupted logits.

    Patching runs the corrupted prompts under their own mask; for prompts of different lengths their
    outputs are then moved to the clean positions they correspond to, with the clean outputs (`clean`,
    recorded here when not given) where a position has none (`PromptPairs.align`). The buffer is meant to
    be turned into ablated - clean in place by a `subtract` forward on the clean prompts.
    """
    if job.ablated is not None:
        return _acts(job, len(job.pairs), "delta").fill(job.ablated.for_pairs(job.pairs)), None
    corrupted = job.pairs.corrupted_side()
    acts, logits = _forward_sources(job, corrupted.clean.to(job.model.device), "delta", corrupted)
    if job.pairs.aligned:
        if clean is None:
            clean, _ = _forward_sources(job, job.pairs.clean.to(job.model.device), "clean")
        acts.align_(job.pairs, clean)
    return acts, logits


def _clean_and_delta(job: Job) -> tuple[Tensor, SourceOutputs, Tensor, SourceOutputs, Tensor | None]:
    """Clean ids, clean source outputs and logits, ablated - clean source outputs, corrupted logits."""
    clean_ids = job.pairs.clean.to(job.model.device)
    clean_acts, clean_logits = _forward_sources(job, clean_ids, "clean")
    ablated, corrupted_logits = _ablated_acts(job, clean_acts)
    return clean_ids, clean_acts, clean_logits, ablated.sub_(clean_acts), corrupted_logits


def _corrupted_metric(job: Job, corrupted_logits: Tensor | None, clean_logits: Tensor) -> Tensor | None:
    """The metric of the corrupted run, read where the corrupted prompts end."""
    if corrupted_logits is None:
        return None
    return _metric(job, corrupted_logits, clean_logits, pairs=job.pairs.corrupted_side())


def _step_chunks(job: Job) -> Iterator[tuple[Tensor, Tensor]]:
    """Quadrature (alphas, weights) in chunks whose steps x batch rows stay within `max_rows`."""
    alphas, weights = quadrature(job.quadrature, job.steps)
    per_chunk = max(1, job.max_rows // len(job.pairs))
    for start in range(0, job.steps, per_chunk):
        yield alphas[start : start + per_chunk].float(), weights[start : start + per_chunk].float()


def _metric(
    job: Job, logits: Tensor, clean_logits: Tensor | None, repeat: int = 1, pairs: PromptPairs | None = None
) -> Tensor:
    pairs = job.pairs if pairs is None else pairs
    pairs = pairs if repeat == 1 else pairs.repeat(repeat)
    if clean_logits is not None and repeat > 1:
        clean_logits = clean_logits.repeat(repeat, 1, 1)
    where = job.where
    if repeat > 1:  # say where a row count like 40 comes from
        where += f", {len(pairs)} rows: its {len(job.pairs)} pairs x {repeat} (IG steps or patched copies)"
    return check_values(job.metric(logits, pairs, clean_logits), len(pairs), where)


def _differentiable(job: Job, values: Tensor) -> Tensor:
    """The metric's output, which a backward pass needs to depend on the logits."""
    if not values.requires_grad:
        raise InputError(
            f"the metric's output does not depend on the logits (no gradient) for {job.where}: a constant "
            "metric has no attributions; compute it from the logits it is given"
        )
    return values


# ------------------------------------------------------------------------------------------ methods
@register("eap", passes=lambda _m, _layers: (1, 1), gradient_at_clean_only=True)
@register("relp", passes=lambda _m, _layers: (1, 1), backward="relp", gradient_at_clean_only=True)
def eap(job: Job) -> BatchResult:
    """EAP, or RelP when the job carries RelP's rules (the same passes, a modified backward)."""
    delta, corrupted_logits = _ablated_acts(job)  # becomes ablated - clean in the clean forward
    edges, nodes = _accumulators(job)
    output_grads = _output_grads(job)
    recorder = _recorder(job, torch.ones(1), edges, nodes, delta, output_grads=output_grads)
    hooks = _with_rules(
        job,
        [
            (job.model.input_hook, _grad_leaf),
            *source_hooks(job.model, job.graph, delta, subtract=True),
            *recorder.hooks(),
        ],
    )
    logits = _run(job, job.pairs.clean.to(job.model.device), hooks, grad=True)
    clean_logits = logits.detach()
    values = _differentiable(job, _metric(job, logits, clean_logits))
    recorder.backward(values.sum())
    metric_corrupted = _corrupted_metric(job, corrupted_logits, clean_logits)
    crossing = _crossing(job, delta, output_grads)
    return BatchResult(
        edges, _node_totals(edges, nodes), values.detach(), metric_corrupted, None, crossing=crossing
    )


@register(
    "atp*", passes=lambda _m, _layers: (1, 1), backward="own", recomputable=False, gradient_at_clean_only=True
)
def atp_star(job: Job) -> BatchResult:
    """AtP*: EAP's scores with the QK fix on q/k edges; at node level, GradDrop over the layers. Per
    span, the fix moves q and k at the span's positions only, and GradDrop's |.| is taken per span.

    Node level: per example and for each layer l, the QK-fixed node scores with layer l's residual writes
    dropped from the backward pass; the score is sum_examples sum_l |.| / (L - 1) (the paper's c_AtP*).
    Edge level: the QK-fixed signed scores (GradDrop's |.| per example and pass is no edge decomposition).
    """
    model, graph = job.model, job.graph
    n_layers = graph.spec.n_layers
    if job.level == "node" and n_layers < 2:
        raise InputError(
            "GradDrop averages over the other L - 1 layers: it needs a model of 2 layers or more"
        )
    delta, corrupted_logits = _ablated_acts(job)
    edges, nodes = _accumulators(job)
    output_grads = _output_grads(job)
    recorder = _recorder(job, torch.ones(1), edges, nodes, delta, output_grads=output_grads)
    capture = QKCapture(model, graph)
    hooks = [
        (model.input_hook, _grad_leaf),
        *source_hooks(model, graph, delta, subtract=True),
        *recorder.hooks(),
        *capture.hooks(),
    ]
    logits = _run(job, job.pairs.clean.to(model.device), hooks, grad=True)
    clean_logits = logits.detach()
    values = _differentiable(job, _metric(job, logits, clean_logits))
    drops: list[int | None] = [None] if job.level == "edge" else [None, *range(n_layers)]
    per_pass = []
    span_index = job.pairs.span_index if _n_spans(job) is not None else None
    try:
        for drop in drops:
            capture.drop = drop
            recorder.nodes = torch.zeros_like(nodes)
            recorder.backward(values.sum(), retain_graph=True)
            per_pass.append(recorder.nodes)
        # per span s, q and k moved at its positions only (the softmax recomputed for that): the first
        # pass's edge corrections, or the node sums of the dropped passes
        kept = []
        for s in range(1 if span_index is None else job.n_spans):
            moved = delta if span_index is None else _at_span(job, delta, span_index == s)
            fixes, _ = qk_corrections(model, graph, capture, moved)  # [passes, n_src, b, n_dst]
            kept.append(fixes[0].sum(1) if edges is not None else fixes[1:].sum(-1))
    finally:
        capture.release()
    metric_corrupted = _corrupted_metric(job, corrupted_logits, clean_logits)
    if edges is not None:
        edges += (kept[0] if span_index is None else torch.stack(kept)).to(edges.device)
        crossing = _crossing(job, delta, output_grads)
        return BatchResult(
            edges, _node_totals(edges, nodes), values.detach(), metric_corrupted, None, crossing=crossing
        )
    # [L, b, n_src], or per span [L, b, S, n_src]: the QK-fixed node scores of each dropped pass
    fixed = kept[0].transpose(1, 2) if span_index is None else torch.stack(kept).permute(1, 3, 0, 2)
    fixed = fixed.to(nodes.device)
    for layer in range(n_layers):  # dropping a source's own layer cuts every path out of it, q/k edges too
        fixed[layer, ..., graph.head_sources(layer)] = 0
        fixed[layer, ..., graph.mlp_source(layer)] = 0
    fixed += torch.stack(per_pass)[1:]
    grad_drop = fixed.abs().sum(0) / (n_layers - 1)
    return BatchResult(None, grad_drop.sum(0), values.detach(), metric_corrupted, None)


@register(
    "clean-corrupted",
    needs_corrupted=True,
    passes=lambda _m, _layers: (0, 2),
    buffers=3,
    rows="clean and corrupted",
)
def clean_corrupted(job: Job) -> BatchResult:
    """The mean of the gradients at the clean and the corrupted runs. For prompts of different lengths
    the corrupted run is no point of the clean positions' patching: its end there is the run with the
    input patched (IG's path end), and the method is IG on the inputs with the two ends as its grid."""
    if job.pairs.aligned:
        ends = [(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]))]
        return replace(_ig_inputs(job, lambda: iter(ends)), ig_total=None)
    b = len(job.pairs)
    ids = torch.cat([job.pairs.clean, job.pairs.corrupted]).to(job.model.device)
    acts = _acts(job, 2 * b, "clean")
    edges, nodes = _accumulators(job)
    output_grads = _output_grads(job)
    recorder = _recorder(job, torch.full((2,), 0.5), edges, nodes, output_grads=output_grads)
    hooks = _with_rules(
        job,
        [(job.model.input_hook, _grad_leaf), *source_hooks(job.model, job.graph, acts), *recorder.hooks()],
    )
    logits = _run(job, ids, hooks, grad=True)
    clean_logits = logits[:b].detach()
    values = _differentiable(job, _metric(job, logits, clean_logits, repeat=2))
    recorder.delta = _difference(job, acts.map(lambda t: t[b:]), acts.map(lambda t: t[:b]))
    recorder.backward(values.sum())
    crossing = _crossing(job, recorder.delta, output_grads)
    return BatchResult(
        edges, _node_totals(edges, nodes), values[:b].detach(), values[b:].detach(), None, crossing=crossing
    )


@register(
    "eap-ig-inputs",
    needs_corrupted=True,
    uses_ig_steps=True,
    passes=lambda m, _layers: (2, m),
    rows="IG steps",
)
def eap_ig_inputs(job: Job) -> BatchResult:
    return _ig_inputs(job, lambda: _step_chunks(job))


def _ig_inputs(job: Job, grid: Callable[[], Iterator[tuple[Tensor, Tensor]]]) -> BatchResult:
    """IG on the inputs over the (alphas, weights) chunks of `grid`: e_corr + alpha (e_clean - e_corr)."""
    model, graph, b = job.model, job.graph, len(job.pairs)
    delta, corrupted_logits = _ablated_acts(job)
    assert corrupted_logits is not None, "eap-ig-inputs interpolates towards the corrupted prompts"
    e_corr = delta.select(0).clone()
    hooks = source_hooks(model, graph, delta, subtract=True)
    clean_logits = _run(job, job.pairs.clean.to(model.device), hooks, grad=False)  # delta = corr - clean
    e_clean = e_corr - delta.select(0)
    edges, nodes = _accumulators(job)
    output_grads = _output_grads(job)
    for alphas, weights in grid():
        m = alphas.shape[0]
        a = alphas.to(e_clean.device).repeat_interleave(b)[:, None, None]

        def interpolate(x: Tensor, a: Tensor = a, m: int = m) -> Tensor:
            mixed = e_corr.repeat(m, 1, 1) + a * (e_clean - e_corr).repeat(m, 1, 1)
            return mixed.to(x).requires_grad_(True)

        recorder = _recorder(job, weights, edges, nodes, delta, output_grads=output_grads)
        ids = job.pairs.clean.to(model.device).repeat(m, 1)
        hooks = _with_rules(job, [(model.input_hook, interpolate), *recorder.hooks()])
        logits = _run(job, ids, hooks, grad=True)
        recorder.backward(_differentiable(job, _metric(job, logits, clean_logits, repeat=m)).sum())
    ig_total = -_input_totals(nodes)  # sum over positions of (e_clean - e_corr) . mean gradient at the input
    path_end = None
    if job.pairs.aligned:
        patched_input: list[tuple[str, HookFn]] = [(model.input_hook, lambda x: e_corr.to(x))]
        path_end = _metric(
            job, _run(job, job.pairs.clean.to(model.device), patched_input, grad=False), clean_logits
        )
    return BatchResult(
        edges,
        _node_totals(edges, nodes),
        _metric(job, clean_logits, clean_logits),
        _corrupted_metric(job, corrupted_logits, clean_logits),
        ig_total,
        path_end,
        _crossing(job, delta, output_grads),
    )


@register(
    "eap-ig-activations",
    uses_ig_steps=True,
    passes=lambda m, n_layers: (2, m * (2 * n_layers + 1)),
    buffers=2,
    rows="IG steps",
)
def eap_ig_activations(job: Job) -> BatchResult:
    model, graph, b = job.model, job.graph, len(job.pairs)
    clean_ids, clean_acts, clean_logits, delta, corrupted_logits = _clean_and_delta(job)
    edges, nodes = _accumulators(job)
    output_grads = _output_grads(job)
    for site in wiring(model, graph.spec).sources:
        members = site.sources
        hook_name, clean_out, delta_out = _site_output(model, site, clean_acts, delta)
        for alphas, weights in _step_chunks(job):
            m = alphas.shape[0]
            a = alphas.to(clean_out.device).repeat_interleave(b)[:, None, None]

            def interpolate(
                x: Tensor, a: Tensor = a, m: int = m, c: Tensor = clean_out, dlt: Tensor = delta_out
            ) -> Tensor:
                return (c.repeat(m, 1, 1) + (1 - a) * dlt.repeat(m, 1, 1)).to(x).requires_grad_(True)

            recorder = _recorder(job, weights, edges, nodes, delta, members, output_grads)
            hooks = _with_rules(job, [(hook_name, interpolate), *recorder.hooks()])
            logits = _run(job, clean_ids.repeat(m, 1), hooks, grad=True)
            recorder.backward(_differentiable(job, _metric(job, logits, clean_logits, repeat=m)).sum())
    metric_corrupted = _corrupted_metric(job, corrupted_logits, clean_logits)
    return BatchResult(
        edges,
        _node_totals(edges, nodes),
        _metric(job, clean_logits, clean_logits),
        metric_corrupted,
        None,
        crossing=_crossing(job, delta, output_grads),
    )


def _site_output(
    model: HookedModel, site: SourceSite, clean: SourceOutputs, delta: SourceOutputs
) -> tuple[str, Tensor, Tensor]:
    """Hook carrying a source site's summed output, its clean value and its ablation difference."""
    if site.kind == "input":
        return site.output_hook, clean.select(0), delta.select(0)
    clean_sum = clean.select(site.sources).sum(2)
    if site.per_head and model.b_O(site.layer) is not None:
        clean_sum = clean_sum + model.b_O(site.layer)  # type: ignore[operator]
    return site.output_hook, clean_sum, delta.select(site.sources).sum(2)


@register("exact", backward="none", buffers=2, recomputable=False, rows="units")
def exact(job: Job) -> BatchResult:
    """Ablate one edge (or node) at a time, many side by side in the batch dimension; split by span,
    one edge (node) at one span's positions at a time."""
    model, graph, b = job.model, job.graph, len(job.pairs)
    clean_ids = job.pairs.clean.to(model.device)
    clean_logits = _run(job, clean_ids, [], grad=False)
    ablated, corrupted_logits = _ablated_acts(job)  # [b, P, n_sources, d]
    base = _metric(job, clean_logits, clean_logits)
    spans = _n_spans(job)
    span_index = None if spans is None else job.pairs.span_index
    # the units' shape: [n_sources, n_destinations] edges or [n_sources] nodes, with spans first
    shape = (*(() if spans is None else (spans,)), graph.n_sources)
    if job.level == "edge":
        shape = (*shape, graph.n_destinations)
        units = graph.valid.expand(shape).nonzero()  # [n_units, 2 or 3]
    else:
        units = torch.ones(shape, dtype=torch.bool).nonzero()
    if span_index is not None:  # a span without positions in this batch changes nothing
        present = torch.zeros(spans, dtype=torch.bool)  # type: ignore[arg-type]
        present[span_index[span_index >= 0].unique().cpu()] = True
        units = units[present[units[:, 0]]]
    per_chunk = max(1, job.max_rows // b)
    totals = torch.zeros(units.shape[0])
    for start in range(0, units.shape[0], per_chunk):
        chunk = units[start : start + per_chunk]
        e = chunk.shape[0]
        ids = clean_ids.repeat(e, 1)
        mask = job.pairs.attention_mask.to(model.device).repeat(e, 1)
        if job.level == "edge":
            edges_mask = torch.zeros(e, *shape, dtype=torch.bool)
            where = (torch.arange(e), *chunk.T)
            edges_mask[where] = True
            logits = forward_with_ablation(
                model, graph, ids, mask, ablated, edges_mask.repeat_interleave(b, 0), span_index
            )
        else:
            node_rows = chunk[:, -1].repeat_interleave(b)
            positions = None
            if span_index is not None:  # row r ablates its node at the positions of its unit's span
                positions = span_index.repeat(e, 1) == chunk[:, 0].repeat_interleave(b)[:, None].to(
                    span_index
                )
            logits = forward_with_node_ablation(model, graph, ids, mask, ablated, node_rows, positions)
        values = _metric(job, logits, clean_logits, repeat=e).reshape(e, b)
        totals[start : start + e] = (values - base).sum(1).cpu()
    scores = torch.zeros(shape)
    scores[tuple(units.T)] = totals
    edges, nodes = (scores, None) if job.level == "edge" else (None, scores)
    metric_corrupted = _corrupted_metric(job, corrupted_logits, clean_logits)
    crossing = None
    if span_index is not None and job.level == "edge":
        crossing = _exact_crossing(job, clean_ids, ablated, base, clean_logits)
    return BatchResult(edges, nodes, base, metric_corrupted, None, crossing=crossing)


def _exact_crossing(
    job: Job, clean_ids: Tensor, ablated: SourceOutputs, base: Tensor, clean_logits: Tensor
) -> Tensor:
    """[S, S, n_sources, 2] M(one crossing edge ablated) - M(clean), summed over the batch."""
    model, graph, b = job.model, job.graph, len(job.pairs)
    span_index = job.pairs.span_index
    assert span_index is not None
    clean, _ = _forward_sources(job, clean_ids, "clean")
    delta = _acts(job, b, "crossing delta").difference(ablated, clean)
    mask = job.pairs.attention_mask.to(model.device)
    changes = head_output_changes(
        model, graph, clean_ids, mask, span_index.to(model.device), job.n_spans, delta, job.max_rows
    )
    heads = [i for site in head_sites(model, graph) for i in range(site.sources.start, site.sources.stop)]
    valid = crossing_valid(graph, job.n_spans, heads)
    present = torch.zeros(job.n_spans, dtype=torch.bool)
    present[span_index[span_index >= 0].unique().cpu()] = True
    valid &= present[:, None, None, None] & present[None, :, None, None]
    units = valid.nonzero()  # [n, 4]: key / value span, query span, head source, letter
    totals = torch.zeros(units.shape[0])
    per_chunk = max(1, job.max_rows // b)
    for start in range(0, units.shape[0], per_chunk):
        chunk = units[start : start + per_chunk]
        e = chunk.shape[0]
        hooks = exact_hooks(model, graph, chunk, changes, span_index.to(model.device), b)
        with torch.no_grad(), model.hooks(hooks):
            logits = model(clean_ids.repeat(e, 1), mask.repeat(e, 1))
        values = _metric(job, logits, clean_logits, repeat=e).reshape(e, b)
        totals[start : start + e] = (values - base).sum(1).cpu()
    scores = torch.zeros(valid.shape)
    scores[tuple(units.T)] = totals
    return scores
