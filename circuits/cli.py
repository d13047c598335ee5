"""`circuits` command line: discover, evaluate and draw circuits; list tasks and a model's baselines.

circuits discover --task ioi --model smollm2-135m --out outputs/ioi
circuits evaluate outputs/ioi/circuit.json --task ioi --curve
circuits draw outputs/ioi/circuit.json --out circuit.png --edges 200
circuits tasks --model smollm2-135m --baseline ioi
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuits.attribution.methods import DEFAULT_METHOD, METHODS
from circuits.distributed import is_main
from circuits.errors import CircuitsError, InputError
from circuits.evaluation.curves import PROTOCOLS
from circuits.folders import check_writable
from circuits.metrics import Metric, metric_name
from circuits.models.loading import DEVICE_MAP_PLANS
from circuits.models.relp import RELP_RULES, RelPRules
from circuits.quadrature import EDGE_QUADRATURES
from circuits.selection.strategies import SELECTIONS, Selection, Selector, ratio_selection

if TYPE_CHECKING:
    from circuits.graph import Graph
    from circuits.models.hooked import HookedModel
    from circuits.spans import Spans
    from circuits.task import TaskPairs

EXAMPLES = __doc__.split("\n\n", 1)[1]


TINY_MODELS = ("tiny-llama", "tiny-gpt2")  # offline random toys, for trying the commands and for CI
OS_ERROR_EXIT = 8  # an operating-system error outside the library's own (disk full, permissions)
INTERRUPTED_EXIT = 130  # Ctrl-C, as shells report SIGINT


DTYPES = ("float32", "bfloat16", "float16")


def _model(args: argparse.Namespace) -> HookedModel:
    import torch

    from circuits.models import load_model

    dtype = getattr(torch, args.dtype)
    if args.model.startswith("tiny-"):
        from circuits.testing import tiny_gpt2, tiny_llama

        if args.model not in TINY_MODELS:
            raise InputError(
                f"--model {args.model}: no such toy model; the toys are {', '.join(TINY_MODELS)}"
            )
        build = {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2}[args.model]
        return build(device=args.device, dtype=dtype, device_map=args.device_map)
    return load_model(args.model, device=args.device, dtype=dtype, device_map=args.device_map)


def _task(args: argparse.Namespace, model: HookedModel) -> TaskPairs:
    from circuits.task import make_task

    name = None if args.data is not None else args.task
    return make_task(
        model,
        name,
        args.n,
        seed=args.seed,
        data=args.data,
        metric=_metric(args.metric),
        drop_invalid=args.skip_invalid,
    )


def _metric(spec: str | None) -> str | Metric | None:
    """A built-in metric's name as given, or the function `module:function` names."""
    if spec is None or ":" not in spec:
        return spec
    module, _, function = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as failure:
        raise InputError(
            f"--metric {spec!r}: cannot import {function!r} from {module!r} ({failure})"
        ) from None
    if not callable(found):
        raise InputError(f"--metric {spec!r} is a {type(found).__name__}, not a function")
    return found  # type: ignore[no-any-return]


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="'smollm2-135m' (embedded), a hub name or folder, a GGUF file's path, or 'tiny-llama' / "
        "'tiny-gpt2' (random toys)",
    )
    parser.add_argument(
        "--device",
        help="cpu, cuda, cuda:1, ... (default cpu); under torchrun 'cuda' is each process's own GPU",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="the model's precision (scores are float32)"
    )
    parser.add_argument(
        "--device-map",
        choices=DEVICE_MAP_PLANS,
        help="instead of --device: the model's layers placed over the visible devices (accelerate's plans)",
    )


def _add_task_args(parser: argparse.ArgumentParser) -> None:
    from circuits.task import task_builders

    parser.add_argument(
        "--task", default="ioi", choices=sorted(task_builders()), help="generated task (default ioi)"
    )
    parser.add_argument(
        "--data", type=Path, help="prompt-pair file instead of a generated task (CSV / JSONL)"
    )
    parser.add_argument(
        "--n",
        "--n-pairs",
        dest="n",
        type=int,
        default=32,
        help="prompt pairs to generate (default 32; under torchrun write --n-pairs: torchrun reads --n as an "
        "abbreviation of its own options)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="with --data: drop the rows that cannot be used (each listed with why) instead of stopping",
    )
    parser.add_argument(
        "--metric",
        help="score with this metric instead of the task's: one of logit_diff, prob_diff, kl, "
        "answer_logprob, or module:function (a metric of your own, see circuits.metrics)",
    )


def _add_bootstrap_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resamples",
        type=int,
        default=1000,
        help="bootstrap draws over the pairs for the 95%% intervals of faithfulness, CPR and CMD (0: none)",
    )


def _add_protocol_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--protocol",
        default="mib",
        choices=PROTOCOLS,
        help="how the curves count budgets and place x: mib (MIB's evaluation, default) or pruned (the "
        "fraction of edges left after pruning; docs/mib.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuits",
        description="Find, evaluate and draw circuits in transformer language models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    _add_discover(commands)
    _add_file_commands(commands)
    t = commands.add_parser("tasks", help="list the tasks, or show a model's baseline on them")
    _add_model_args(t)
    t.add_argument("--baseline", nargs="*", metavar="TASK", help="tasks to run the baseline on (none: all)")
    t.add_argument("--n", type=int, default=32)
    return parser


def _add_discover(commands: Any) -> None:
    d = commands.add_parser(
        "discover", help="score edges for a task, select and evaluate a circuit, write files"
    )
    _add_model_args(d)
    _add_task_args(d)
    _add_scoring_args(d)
    _add_selection_args(d)
    d.add_argument("--no-curve", action="store_true", help="skip the faithfulness curves (CPR / CMD)")
    _add_protocol_arg(d)
    _add_bootstrap_args(d)
    d.add_argument(
        "--ungrouped",
        action="store_true",
        help="score the ungrouped graph of a grouped-query model (every query head with its own k and v "
        "inputs): EAP-IG's and MIB's edges, so MIB's protocol gives MIB's numbers",
    )
    d.add_argument(
        "--stability",
        type=int,
        default=0,
        metavar="K",
        help="re-score K bootstrap resamples of the pairs and report the Jaccard index of their circuits "
        "with this one (K more attribution runs; default 0: skip)",
    )
    d.add_argument(
        "--positions",
        default="summed",
        choices=["summed", "spans"],
        help="summed: edges summed over positions (default); spans: a position-aware circuit, a node per "
        "site and span and crossing edges inside attention (PEAP), top --edges span and crossing edges",
    )
    d.add_argument(
        "--schema",
        default="task",
        help="with --positions spans, where the spans come from: task (the generator's templates, default), "
        "differences (where clean and corrupted prompts differ), answers (those, with the tokens equal to "
        'the answer or distractor as spans of their own), or a JSON file {"spans": [names], '
        '"index": [[span of each position] per prompt]}',
    )
    d.add_argument("--out", type=Path, default=Path("outputs/discover"), help="output folder")


def _add_scoring_args(d: argparse.ArgumentParser) -> None:
    """How edges are scored (`ScoringOptions`)."""
    d.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS))
    d.add_argument("--steps", type=int, default=5, help="IG steps (default 5)")
    d.add_argument("--quadrature", default="left", choices=EDGE_QUADRATURES)
    d.add_argument(
        "--rules",
        nargs="*",
        choices=RELP_RULES,
        metavar="RULE",
        help="RelP's backward rules, any of ln identity half cp (with --method relp the default is the "
        "paper's: ln identity half; with eap / eap-ig-* they give those methods RelP's backward)",
    )
    d.add_argument(
        "--max-memory",
        type=float,
        metavar="GIB",
        help="memory budget of the scoring in GiB: smaller batches / passes and recomputed blocks as needed "
        "(the scores do not change)",
    )


def _add_selection_args(d: argparse.ArgumentParser) -> None:
    """How the circuit is chosen from the scores (`DiscoveryOptions`)."""
    d.add_argument("--edges", type=int, default=300, help="edges in the selected circuit (default 300)")
    d.add_argument(
        "--selection",
        default="top_n",
        choices=[*SELECTIONS, "ratio", "refined"],
        help="how the circuit and the curves' circuits are chosen from the scores "
        "(circuits.selection.strategies; default top_n). refined: top_n, then gradient-guided edge swaps "
        "checked on the task's pairs (circuits.evaluation.refinement); the curves are measured on those "
        "same pairs, so they are optimistic: for held-out numbers see scripts/mib_intervals.py",
    )
    d.add_argument(
        "--refine-rounds",
        type=int,
        default=2,
        metavar="R",
        help="refined selection: rounds of swaps per circuit (default 2)",
    )
    d.add_argument(
        "--positive-fraction",
        type=float,
        default=None,
        metavar="R",
        help="ratio selection: the share of each budget for the edges that help the metric most "
        "(default 0.5)",
    )
    d.add_argument(
        "--ensemble",
        nargs="+",
        choices=sorted(METHODS),
        default=(),
        metavar="METHOD",
        help="also score with these methods and rank the mean of the max-normalised scores",
    )
    d.add_argument(
        "--sign-consistency",
        type=int,
        default=0,
        metavar="R",
        help="re-score R bootstrap resamples of the pairs and zero the edges whose sign agrees in fewer than "
        "--agreement of them before selecting (default 0: off)",
    )
    d.add_argument("--agreement", type=float, default=0.9, help="sign-consistency threshold (default 0.9)")


def _add_file_commands(commands: Any) -> None:
    """evaluate, draw and view: commands that read a circuit file."""
    e = commands.add_parser("evaluate", help="faithfulness of a circuit file on a task (and its curve)")
    e.add_argument("circuit", type=Path, help="circuit file (.json EAP-IG / MIB format, or .pt)")
    _add_model_args(e)
    _add_task_args(e)
    e.add_argument("--ablation", default="patching", choices=["patching", "mean", "zero"])
    e.add_argument("--curve", action="store_true", help="also the MIB curves and CPR / CMD of its scores")
    _add_protocol_arg(e)
    _add_bootstrap_args(e)

    r = commands.add_parser("draw", help="draw a circuit file as SVG / PNG")
    r.add_argument("circuit", type=Path)
    r.add_argument("--out", type=Path, required=True, help="output .svg, .png or .pdf")
    r.add_argument("--edges", type=int, help="redraw with the top N edges by |score| (pruned)")
    r.add_argument(
        "--shown",
        type=int,
        help="edges drawn, the largest by |score| (default circuits.pictures.drawing.MAX_EDGES = 60; 0: all)",
    )

    v = commands.add_parser("view", help="write a circuit file as an interactive HTML page (works offline)")
    v.add_argument("circuit", type=Path, help="circuit file (.json EAP-IG / MIB format, or .pt)")
    v.add_argument("--out", type=Path, required=True, help="output .html")
    v.add_argument("--title", help="the page's title (default: the model's name)")
    v.add_argument(
        "--circuit-tracer",
        type=Path,
        metavar="JSON",
        help="also write the circuit as a circuit-tracer / Neuronpedia graph file",
    )


def main(argv: list[str] | None = None) -> int:
    """Run a command; every library error, OS error and Ctrl-C ends in one line on stderr and an exit code:
    `CircuitsError.exit_code` per error class (`circuits.errors`), 8 for other OS errors, 130 for Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"circuits {args.command}"
    try:
        if is_main():
            return COMMANDS[args.command](args)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # torchrun: rank 0 prints
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; no output folder was changed", file=sys.stderr)
        return INTERRUPTED_EXIT
    except CircuitsError as err:
        print(f"{prefix}: error ({type(err).__name__}): {_one_line(err)}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"{prefix}: error ({type(err).__name__}): {_one_line(err)}", file=sys.stderr)
        return OS_ERROR_EXIT


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _discover(args: argparse.Namespace) -> int:
    from circuits.pipeline import discover

    check_writable(args.out)
    if args.positive_fraction is not None and args.selection != "ratio":  # before any work
        raise InputError(
            f"--positive-fraction applies to --selection ratio only (the selection is {args.selection})"
        )
    if args.positions == "spans":
        return _discover_spans(args)
    model = _model(args)
    task = _task(args, model)
    found = discover(
        model,
        task,
        **_scoring(args),
        edges=args.edges,
        selection=_selection(args, model, task),
        ensemble=args.ensemble,
        sign_consistency=args.sign_consistency,
        agreement=args.agreement,
        curves=not args.no_curve,
        protocol=args.protocol,
        resamples=args.resamples,
        stability=args.stability,
        ungrouped=args.ungrouped,
        out=args.out,
    )
    print(f"{task}; baseline: {found.baseline}")
    if found.attribution.completeness is not None:
        print(found.attribution.completeness)
    faithfulness = found.faithfulness_interval or f"{found.evaluation.faithfulness:.3f}"
    print(f"circuit: {found.circuit.n_in_graph} edges, faithfulness {faithfulness}{_level(args)}")
    if found.curves is not None:
        cpr, cmd = found.curves.cpr_interval, found.curves.cmd_interval
        print(f"CPR {cpr or f'{found.curves.cpr:.3f}'}, CMD {cmd or f'{found.curves.cmd:.3f}'}{_level(args)}")
    if found.stability is not None:
        print(found.stability)
    print("wrote " + ", ".join(str(f) for f in found.files))
    return 0


def _scoring(args: argparse.Namespace) -> dict[str, Any]:
    """The scoring settings (`ScoringOptions` fields) the command line gives."""
    rules = None if args.rules is None else RelPRules(**{r: r in args.rules for r in RELP_RULES})
    return {
        "method": args.method,
        "ig_steps": args.steps,
        "quadrature": args.quadrature,
        "rules": rules,
        "batch_size": args.batch_size,
        "max_memory": args.max_memory,
    }


def _discover_spans(args: argparse.Namespace) -> int:
    """`discover --positions spans`: score a SpanGraph, keep the top (or greedily grown) span and crossing
    edges, pruned, evaluate, write circuit.json (the circuit's edges, span-qualified names), scores.pt and
    summary.json."""
    import json

    import torch

    from circuits.attribution import attribute
    from circuits.evaluation import evaluate
    from circuits.folders import replacing_folder
    from circuits.span_graph import SpanGraph

    unsupported = {
        "--selection": args.selection not in ("top_n", "greedy"),
        "--ungrouped": args.ungrouped,
        "--stability": bool(args.stability),
        "--ensemble": bool(getattr(args, "ensemble", None)),
        "--sign-consistency": bool(getattr(args, "sign_consistency", False)),
    }
    given = [flag for flag, on in unsupported.items() if on]
    if given:
        raise InputError(
            f"--positions spans selects top_n or greedy circuits, nothing more yet; drop {', '.join(given)}"
        )
    model = _model(args)
    task = _task(args, model)
    spans = _spans(args, task)
    graph = SpanGraph.from_model(model, spans)
    result = attribute(
        model,
        graph,
        task.pairs,
        task.metric,
        **_scoring(args),
        spans=spans,
    )
    circuit = graph.greedy(args.edges) if args.selection == "greedy" else graph.top_n(args.edges)
    evaluation = evaluate(model, circuit, task.pairs, task.metric, batch_size=args.batch_size, spans=spans)
    summary = {
        "task": str(task),
        "spans": list(spans.names),
        "method": args.method,
        "edges": circuit.n_in_graph,
        "concrete_edges_per_example": circuit.concrete_edges(spans),
        "faithfulness": evaluation.faithfulness,
        "metric": {"circuit": evaluation.circuit, "full": evaluation.full, "empty": evaluation.empty},
    }
    files = ("circuit.json", "scores.pt", "summary.json")
    with replacing_folder(args.out, files) as folder:
        circuit.to_json(folder / "circuit.json", circuit_only=True)
        scores = {"spans": spans.names, "span_edges": graph.scores, "crossing_edges": graph.crossing_scores}
        torch.save(scores, folder / "scores.pt")
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{task}; spans {' | '.join(spans.names)}")
    if result.completeness is not None:
        print(result.completeness)
    print(
        f"circuit: {circuit.n_in_graph} span and crossing edges ({summary['concrete_edges_per_example']:.0f} "
        f"edges between positions per example), faithfulness {evaluation.faithfulness:.3f}"
    )
    print("wrote " + ", ".join(str(args.out / f) for f in files))
    return 0


def _spans(args: argparse.Namespace, task: TaskPairs) -> Spans:
    from circuits.spans import Spans, answer_marks

    if args.schema in ("differences", "answers"):
        marks = answer_marks(task.pairs) if args.schema == "answers" else None
        return Spans.from_differences(task.pairs, marks=marks)
    if args.schema == "task":
        if task.spans is None:
            raise InputError(
                f"{task.task} gives no spans (its generator names no template pieces, or the tokenizer has "
                "no offsets): use --schema differences or a schema file"
            )
        return task.spans
    spans = Spans.from_json(Path(args.schema))
    spans.check_fits(task.pairs)
    return spans


def _selection(args: argparse.Namespace, model: HookedModel, task: TaskPairs) -> Selection | Selector:
    if args.selection == "ratio":
        return ratio_selection(0.5 if args.positive_fraction is None else args.positive_fraction)
    if args.selection == "refined":
        from circuits.evaluation.refinement import refined_selection

        return refined_selection(
            model, task.pairs, task.metric, rounds=args.refine_rounds, batch_size=args.batch_size
        )
    return args.selection  # type: ignore[no-any-return]


def _load_circuit(path: Path) -> Graph:
    from circuits.graph import Graph

    return Graph.from_pt(path) if path.suffix == ".pt" else Graph.from_json(path)


def _circuit_metric(args: argparse.Namespace, circuit: Graph, task: TaskPairs) -> str | Metric:
    """What `evaluate` scores with: --metric, else the metric the circuit file records (said when it is
    not the task's), else the task's."""
    if args.metric is not None or circuit.metric is None:
        return task.metric
    if circuit.metric != metric_name(task.metric):
        print(
            f"scoring with {circuit.metric}, the metric {args.circuit} was found with (the task's is "
            f"{metric_name(task.metric)}; --metric chooses another)",
            file=sys.stderr,
        )
    found = _metric(circuit.metric)
    assert found is not None
    return found


def _evaluate(args: argparse.Namespace) -> int:
    from circuits.evaluation import evaluate
    from circuits.evaluation.curves import mib_scores
    from circuits.evaluation.intervals import faithfulness_interval
    from circuits.models.ungroup import model_for

    circuit = _load_circuit(args.circuit)
    model = _model(args)
    circuit.check_fits(model_for(model, circuit.spec).spec)
    task = _task(args, model)
    metric = _circuit_metric(args, circuit, task)
    result = evaluate(model, circuit, task.pairs, metric, args.ablation, batch_size=args.batch_size)
    faithfulness = (
        faithfulness_interval(result, args.resamples) if args.resamples else f"{result.faithfulness:.4f}"
    )
    print(
        f"{circuit.n_in_graph} edges: M(circuit) {result.circuit:.4f}, M(full) {result.full:.4f}, "
        f"M(empty) {result.empty:.4f}, faithfulness {faithfulness}{_level(args)}"
    )
    if args.curve:
        scores = mib_scores(
            model,
            circuit,
            task.pairs,
            metric,
            ablation=args.ablation,
            batch_size=args.batch_size,
            resamples=args.resamples,
            protocol=args.protocol,
        )
        for curve in (scores.signed, scores.absolute):
            points = ", ".join(f"{p.percent:g}%: {p.faithfulness:.3f}" for p in curve.points)
            print(f"{'signed' if not curve.absolute else 'absolute'}: {points}")
        cpr, cmd = scores.cpr_interval or f"{scores.cpr:.4f}", scores.cmd_interval or f"{scores.cmd:.4f}"
        print(f"CPR {cpr}, CMD {cmd}{_level(args)}")
    return 0


def _level(args: argparse.Namespace) -> str:
    return f" (95% intervals, {args.resamples} bootstrap draws over the pairs)" if args.resamples else ""


def _draw(args: argparse.Namespace) -> int:
    from circuits.pictures.drawing import MAX_EDGES, draw_circuit

    circuit = _load_circuit(args.circuit)
    if args.edges is not None:
        circuit = circuit.top_n(min(args.edges, circuit.n_edges))
    shown = MAX_EDGES if args.shown is None else args.shown or circuit.n_in_graph
    path = draw_circuit(circuit, args.out, max_edges=shown)
    shown = min(shown, circuit.n_in_graph)
    print(f"wrote {path} ({shown} of {circuit.n_in_graph} edges drawn)")
    return 0


def _view(args: argparse.Namespace) -> int:
    from circuits.pictures.viewer import write_page

    if args.out.suffix != ".html":
        raise InputError(f"--out must name an .html file, got {args.out}")
    circuit = _load_circuit(args.circuit)
    path = write_page(circuit, args.out, title=args.title)
    print(f"wrote {path} ({circuit.n_in_graph} edges, {path.stat().st_size / 1024:.0f} KB)")
    if args.circuit_tracer is not None:
        from circuits.pictures.viewer.circuit_tracer import to_circuit_tracer

        print(f"wrote {to_circuit_tracer(circuit, args.circuit_tracer)}")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from circuits.baseline import baseline
    from circuits.task import task_builders

    tasks = task_builders()

    if args.baseline is None:
        for name, make in tasks.items():
            print(f"{name:14s} {(make.__doc__ or '').strip().splitlines()[0]}")
        return 0
    unknown = [t for t in args.baseline if t not in tasks]
    if unknown:
        raise InputError(f"unknown tasks {unknown}; choose from {sorted(tasks)}")
    model = _model(args)
    for name in args.baseline or list(tasks):
        task = tasks[name](model, args.n)
        print(f"{name:14s} {baseline(model, task)}  ({len(task.pairs)} kept, {task.dropped} dropped)")
    return 0


COMMANDS = {"discover": _discover, "evaluate": _evaluate, "draw": _draw, "view": _view, "tasks": _tasks}

if __name__ == "__main__":
    sys.exit(main())
