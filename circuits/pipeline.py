"""Circuit discovery end to end, shared by the CLI and `scripts/reproduce_ioi.py`.

score edges -> select a circuit -> evaluate its faithfulness -> faithfulness curves over the MIB budgets
(CPR, CMD) -> files: scores.pt, circuit.json, circuit.svg, circuit.html, faithfulness.png, summary.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from circuits.attribution import Attribution, MethodName, ScoringOptions, attribute
from circuits.baseline import Baseline, baseline
from circuits.data import PromptPairs
from circuits.distributed import is_main, world_size
from circuits.errors import InputError
from circuits.evaluation import Evaluation, evaluate
from circuits.evaluation.curves import MIB_PERCENTAGES, CurveProtocol, MIBScores, mib_scores
from circuits.evaluation.intervals import (
    RESAMPLES,
    Interval,
    Stability,
    bootstrap_scores,
    check_resamples,
    circuit_stability,
    faithfulness_interval,
    sign_consistent,
)
from circuits.folders import check_writable, replacing_folder
from circuits.graph import Graph
from circuits.metrics import metric_name
from circuits.models.hooked import HookedModel
from circuits.pictures.drawing import draw_circuit, plot_curves
from circuits.pictures.viewer import write_page
from circuits.selection.strategies import Selection, Selector, ensemble_scores, select, selection_name
from circuits.settings import with_settings
from circuits.task import TaskPairs


class HeadScore(NamedTuple):
    """A head's node score; `name` is `layer.head` as in Wang et al. (a post-norm layer's source: `layer`)."""

    name: str
    score: float
    layer: int
    head: int | None


def top_heads(graph: Graph, attribution: Attribution, k: int) -> list[HeadScore]:
    """The k heads (attention sources) with the most negative node score (ablating them lowers the metric
    most)."""
    scores = attribution.node_scores
    if scores is None:
        raise InputError("top heads need node scores (gradient methods, or level='node')")
    rows = range(graph.n_sources)
    heads = [i for layer in graph.spec.attention_layers for i in rows[graph.head_sources(layer)]]
    found = []
    for i in sorted(heads, key=lambda i: float(scores[i]))[:k]:
        source = graph.sources[i]
        layer, head = graph.node_layer(source), graph.node_head(source)
        assert layer is not None
        name = f"{layer}" if head is None else f"{layer}.{head}"
        found.append(HeadScore(name, float(scores[i]), layer, head))
    return found


@dataclass(frozen=True)
class Discovery:
    """What `discover` found, built whole (the files it wrote, if any, included)."""

    task: TaskPairs
    graph: Graph
    baseline: Baseline
    attribution: Attribution
    circuit: Graph
    evaluation: Evaluation
    curves: MIBScores | None
    heads: list[HeadScore]
    scoring: ScoringOptions  # how `attribution` was computed
    faithfulness_interval: Interval | None = None  # bootstrap over the pairs (circuits.evaluation.intervals)
    stability: Stability | None = None  # the circuit across bootstrap resamples, when asked for
    selection: dict[str, Any] = field(
        default_factory=dict
    )  # how `graph`'s scores and the circuit were chosen
    files: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DiscoveryOptions:
    """How `discover` turns scores into a circuit and reports on it (the scoring itself: `ScoringOptions`).

    Attributes:
        edges: the circuit's size (at most the graph's edges), chosen by `selection`
            (`circuits.selection.strategies`).
        ensemble: more methods whose max-normalised scores are averaged with the main method's.
        sign_consistency, agreement: re-score that many bootstrap resamples and zero every edge whose sign
            agrees on fewer than `agreement` of them before selecting (0: no filter).
        curves, protocol, percentages: faithfulness curves over those budgets (MIB's CPR / CMD).
        resamples: bootstrap draws for the 95% intervals of faithfulness, CPR and CMD (0: none).
        stability: re-score that many bootstrap resamples and report the Jaccard index of their circuits
            with this one (0: skip).
        ungrouped: score and select on the ungrouped graph of a grouped-query model (every query head with
            its own k and v inputs: EAP-IG's and MIB's edges, so MIB's protocol gives MIB's numbers and the
            circuit file reads in EAP-IG as it is; `Graph.from_model`).
    """

    edges: int = 300
    selection: Selection | Selector = "top_n"
    ensemble: tuple[MethodName, ...] = ()
    sign_consistency: int = 0
    agreement: float = 0.9
    curves: bool = True
    protocol: CurveProtocol = "mib"
    percentages: tuple[float, ...] = MIB_PERCENTAGES
    resamples: int = RESAMPLES
    stability: int = 0
    ungrouped: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.edges, bool) or not isinstance(self.edges, int) or self.edges < 0:
            raise InputError(f"edges must be a whole number >= 0, got {self.edges!r}")
        for name in ("sign_consistency", "resamples", "stability"):  # 0: skip, else a bootstrap's draws
            if getattr(self, name) != 0 or isinstance(getattr(self, name), bool):
                check_resamples(getattr(self, name), f"{name} (0: none)")
        agreement = self.agreement
        if isinstance(agreement, bool) or not isinstance(agreement, int | float) or not 0 < agreement <= 1:
            raise InputError(f"agreement must be a fraction in (0, 1], got {agreement!r}")


def discover(
    model: HookedModel,
    task: TaskPairs,
    scoring: ScoringOptions | None = None,
    options: DiscoveryOptions | None = None,
    *,
    out: str | Path | None = None,
    quiet: bool = False,
    **settings: Any,
) -> Discovery:
    """Score `task` on `model`, keep the best edges (pruned), evaluate, and optionally write files (`out`
    is checked for writability before any work, and replaced whole at the end: see `circuits.folders`).

    `scoring` says how edges are scored and `options` what is made of the scores; any field of either
    given as a keyword (`method="eap"`, `edges=200`, `max_memory=8`) takes precedence."""
    scoring, options = _discovery_settings(scoring, options, settings)
    if out is not None:
        check_writable(Path(out))
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    base = baseline(model, task)
    scored = Graph.from_model(model, options.ungrouped)
    attribution = attribute(model, scored, task.pairs, task.metric, options=scoring, quiet=quiet)
    graph = _selection_scores(model, task, scored, scoring, options, quiet)
    seconds["attribution"] = time.perf_counter() - start
    n_edges = min(options.edges, graph.n_edges)
    circuit = select(graph, n_edges, options.selection, absolute=True)
    evaluation = evaluate(model, circuit, task.pairs, task.metric, batch_size=scoring.batch_size)
    start = time.perf_counter()
    scores = None
    if options.curves:
        scores = mib_scores(
            model,
            graph,
            task.pairs,
            task.metric,
            percentages=options.percentages,
            protocol=options.protocol,
            selection=options.selection,
            batch_size=scoring.batch_size,
            resamples=options.resamples,
            quiet=quiet,
        )
    seconds["curves"] = time.perf_counter() - start
    heads = top_heads(graph, attribution, 12) if attribution.node_scores is not None else []
    stability = None
    if options.stability:  # each resample is scored as the pairs were
        start = time.perf_counter()
        stability = circuit_stability(
            model, circuit, task.pairs, task.metric, scoring, n_edges=n_edges, resamples=options.stability
        )
        seconds["stability"] = time.perf_counter() - start
    found = Discovery(
        task,
        graph,
        base,
        attribution,
        circuit,
        evaluation,
        scores,
        heads,
        scoring,
        faithfulness_interval(evaluation, options.resamples) if options.resamples else None,
        stability,
        _selection_record(scoring, options),
        seconds=seconds,
    )
    if out is not None and is_main():  # under torchrun every process has the same results; one writes
        found = replace(found, files=write(found, Path(out), model))
    return found


def _scoring_record(scoring: ScoringOptions) -> dict[str, Any]:
    """Everything of `scoring` that changes the scores (RelP's rules as their names), for summary.json."""
    record = {f.name: getattr(scoring, f.name) for f in fields(ScoringOptions)}
    rules = scoring.rules
    record["rules"] = None if rules is None else [f.name for f in fields(rules) if getattr(rules, f.name)]
    return record


def _version() -> str:
    """This package's installed version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("circuits")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _selection_record(scoring: ScoringOptions, options: DiscoveryOptions) -> dict[str, Any]:
    """How the circuit was chosen, as summary.json records it."""
    consistency = {"resamples": options.sign_consistency, "agreement": options.agreement}
    return {
        "selection": selection_name(options.selection),
        "ensemble": [scoring.method, *options.ensemble] if options.ensemble else None,
        "sign_consistency": consistency if options.sign_consistency else None,
        "protocol": options.protocol,
        "graph": "ungrouped" if options.ungrouped else "grouped",
    }


def _discovery_settings(
    scoring: ScoringOptions | None, options: DiscoveryOptions | None, settings: dict[str, Any]
) -> tuple[ScoringOptions, DiscoveryOptions]:
    """`scoring` and `options` (or their defaults) with the keyword `settings` given to `discover`."""
    discovery_fields = {f.name for f in fields(DiscoveryOptions)}
    mine = {k: v for k, v in settings.items() if k in discovery_fields}
    scoring = (scoring or ScoringOptions()).with_settings(
        **{k: v for k, v in settings.items() if k not in discovery_fields}
    )
    options = with_settings(options or DiscoveryOptions(), mine)
    if isinstance(options.ensemble, list):
        options = replace(options, ensemble=tuple(options.ensemble))
    return scoring, options


def _selection_scores(
    model: HookedModel,
    task: TaskPairs,
    graph: Graph,
    scoring: ScoringOptions,
    options: DiscoveryOptions,
    quiet: bool,
) -> Graph:
    """The scores the circuit is chosen from: the method's, averaged with the ensemble's, with the edges of
    inconsistent sign zeroed."""
    if options.ensemble:
        members = [graph]
        for other in options.ensemble:
            found = attribute(
                model,
                Graph.from_model(model, options.ungrouped),
                task.pairs,
                task.metric,
                other,
                options=scoring,
                quiet=quiet,
            )
            members.append(graph.with_scores(found.edge_scores, found.node_scores))
        graph = ensemble_scores(members)
    if options.sign_consistency:
        resampled = bootstrap_scores(
            model,
            task.pairs,
            task.metric,
            scoring,
            resamples=options.sign_consistency,
            ungrouped=options.ungrouped,
        )
        graph = sign_consistent(graph, resampled, options.agreement)
    return graph


OUTPUT_FILES = (
    "scores.pt",
    "circuit.json",
    "circuit.svg",
    "circuit.html",
    "faithfulness.png",
    "summary.json",
)


def write(found: Discovery, out: Path, model: HookedModel) -> list[Path]:
    """scores.pt, circuit.json, circuit.svg, circuit.html, faithfulness.png (with curves), summary.json,
    written into a
    staging folder that replaces `out` once all are written."""
    with replacing_folder(out, OUTPUT_FILES) as staging:
        files = _write_files(found, staging, model)
    return [out / f.name for f in files]


def _interval_dict(interval: Interval | None) -> dict[str, float] | None:
    return None if interval is None else interval.to_dict()


def _prompts(model: HookedModel, pairs: PromptPairs, n: int = 10) -> list[str]:
    """The first `n` clean prompts as text, with the answer and distractor tokens (answers of several
    tokens: the prompt without them, the whole answer, and the tokens where answer and distractor part)."""
    decode = model.tokenizer.decode
    lines = []
    for i in range(min(n, len(pairs))):
        end = int(pairs.lengths[i])
        answer = decode(pairs.answer[i : i + 1])
        whole = None if pairs.answer_tokens is None else pairs.answer_tokens[i][pairs.answer_tokens[i] >= 0]
        if whole is not None and len(whole) > 1:
            end -= len(whole) - 1
            answer = f"{decode(whole)!r} (parting at {answer!r})"
        else:
            answer = repr(answer)
        lines.append(
            f"{decode(pairs.clean[i, :end])} -> {answer} (not {decode(pairs.distractor[i : i + 1])!r})"
        )
    return lines


def _write_files(found: Discovery, out: Path, model: HookedModel) -> list[Path]:
    graph, circuit = found.graph, found.circuit
    torch.save(
        {
            "edge_scores": found.attribution.edge_scores,
            "node_scores": found.attribution.node_scores,
            "selection_scores": graph.scores,  # what the circuit was chosen from (ensemble / filter)
            "sources": graph.sources,
            "destinations": graph.destinations,
        },
        out / "scores.pt",
    )
    circuit.to_json(out / "circuit.json")
    files = [out / "scores.pt", out / "circuit.json"]
    if circuit.n_in_graph:
        title = f"{found.task.task} circuit, {model.spec.name}"
        files.append(draw_circuit(circuit, out / "circuit.svg", title=title))
        files.append(
            write_page(
                circuit,
                out / "circuit.html",
                title=title,
                faithfulness=found.evaluation.faithfulness,
                prompts=_prompts(model, found.task.pairs),
            )
        )
    summary: dict = {
        "model": model.spec.name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "processes": world_size(),
        "task": found.task.task,
        "metric": metric_name(found.task.metric),
        "method": found.scoring.method,
        "ig_steps": found.scoring.ig_steps if found.scoring.spec.uses_ig_steps else None,
        "scoring": _scoring_record(found.attribution.options or found.scoring),  # as the plan ran it
        "seed": found.task.seed,
        "version": _version(),
        "n_pairs": len(found.task.pairs),
        "baseline": vars(found.baseline),
        "completeness": None
        if found.attribution.completeness is None
        else vars(found.attribution.completeness),
        "top_heads": [(h.name, h.score) for h in found.heads],
        **found.selection,
        "circuit_edges": circuit.n_in_graph,
        "faithfulness": found.evaluation.faithfulness,
        "metric_circuit": found.evaluation.circuit,
        "metric_full": found.evaluation.full,
        "metric_empty": found.evaluation.empty,
        "faithfulness_interval": _interval_dict(found.faithfulness_interval),
        "stability": None if found.stability is None else found.stability.to_dict(),
        "seconds": found.seconds,
    }
    if found.curves is not None:
        files.append(
            plot_curves(
                [found.curves.signed, found.curves.absolute],
                out / "faithfulness.png",
                title=f"{found.task.task}, {model.spec.name}",
            )
        )
        summary["CPR"] = found.curves.cpr
        summary["CMD"] = found.curves.cmd
        summary["CPR_interval"] = _interval_dict(found.curves.cpr_interval)
        summary["CMD_interval"] = _interval_dict(found.curves.cmd_interval)
        summary["curves"] = {
            "signed": found.curves.signed.to_dict(),
            "absolute": found.curves.absolute.to_dict(),
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    files.append(out / "summary.json")
    return files
