"""`mib_scores` computes CPR and CMD as MIB's circuit-track evaluation does (hannamw/MIB-circuit-track,
`MIB_circuit_track/evaluation.py::evaluate_area_under_curve` with EAP-IG's `Graph.apply_topn` and
`Graph.prune`).

The reference here is written from those published formulas, independently of the library's selection
and curve code: for each fraction in (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1), take the
int(fraction x n_edges) best edges by argsort (signed for CPR, |score| for CMD), prune by EAP-IG's rule
(repeatedly drop nodes without an incoming or an outgoing edge, then edges whose parent or child is gone),
evaluate, normalise with the empty circuit and the full model (means over the examples first), and take
the trapezoid areas of f and |1 - f| over the fractions. `tests/data/mib_curve.json` holds faithfulness
values chosen by hand (one below 0, some above 1) and the two areas MIB's loop gives for them, so that a
change to the area rule shows.
"""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from circuits import Graph, attribute
from circuits.errors import CircuitsWarning
from circuits.evaluation import evaluate_many
from circuits.evaluation.curves import area, faithfulness_curve, mib_scores
from circuits.models.hooked import ModelSpec
from circuits.selection.strategies import mib_edge_weights, top_budget
from tests.pairs import make_pairs

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
FIXTURE = Path(__file__).parent / "data" / "mib_curve.json"


def _mib_areas(x: list[float], f: list[float]) -> tuple[float, float]:
    """MIB's loop: area under f and under |1 - f|, trapezoids over consecutive fractions."""
    under = from_one = 0.0
    for i in range(len(f) - 1):
        width = x[i + 1] - x[i]
        from_one += width * (abs(1.0 - f[i]) + abs(1.0 - f[i + 1])) / 2
        under += width * (f[i] + f[i + 1]) / 2
    return under, from_one


def _owner(dst: str) -> str | None:
    """The node reading a destination in EAP-IG's graph: a head's q/k/v input, an MLP, or the logits."""
    head = re.match(r"^(a\d+\.h\d+)<[qkv]>$", dst)
    return head.group(1) if head else (None if dst == "logits" else dst)


def _eap_ig_prune(graph: Graph, chosen: torch.Tensor) -> torch.Tensor:
    edges = {(r, c) for r, c in chosen.nonzero().tolist()}
    while True:
        outgoing = {graph.sources[r] for r, _ in edges}
        incoming = {_owner(graph.destinations[c]) for _, c in edges} | {"input"}
        nodes = outgoing & incoming
        kept = {
            (r, c)
            for r, c in edges
            if graph.sources[r] in nodes
            and (_owner(graph.destinations[c]) in nodes or graph.destinations[c] == "logits")
        }
        if kept == edges:
            break
        edges = kept
    out = torch.zeros_like(chosen)
    for r, c in edges:
        out[r, c] = True
    return out


def _reference(model, graph: Graph, pairs, absolute: bool) -> tuple[float, float, list[float]]:
    n_edges = int(graph.valid.sum())
    scores = graph.scores.abs() if absolute else -graph.scores  # EAP-IG ranks descending; ours: - = helps
    scores = scores.masked_fill(~graph.valid, float("-inf")).flatten()
    order = torch.argsort(scores, descending=True)
    circuits = []
    for fraction in FRACTIONS:
        chosen = torch.zeros(scores.numel(), dtype=torch.bool)
        chosen[order[: int(fraction * n_edges)]] = True
        circuit = graph.copy()
        circuit.in_graph = _eap_ig_prune(graph, chosen.reshape(graph.valid.shape))
        circuits.append(circuit)
    results = evaluate_many(model, circuits, pairs)
    full, empty = results[0].full, results[0].empty
    f = [(r.circuit - empty) / (full - empty) for r in results]
    under, from_one = _mib_areas(list(FRACTIONS), f)
    return under, from_one, f


def test_area_rule_matches_the_fixture():
    data = json.loads(FIXTURE.read_text())
    under, from_one = _mib_areas(data["fractions"], data["faithfulness"])
    assert under == pytest.approx(data["area_under"], abs=1e-12)
    assert from_one == pytest.approx(data["area_from_1"], abs=1e-12)
    assert area(data["fractions"], data["faithfulness"]) == pytest.approx(data["area_under"], abs=1e-12)


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs"])
def test_mib_scores_match_the_mib_evaluation(gpt2, method):
    pairs = make_pairs(gpt2)
    graph = Graph.from_model(gpt2)
    attribute(gpt2, graph, pairs, method=method, quiet=True)
    ours = mib_scores(gpt2, graph, pairs, resamples=0)
    cpr, _, f_signed = _reference(gpt2, graph, pairs, absolute=False)
    _, cmd, f_absolute = _reference(gpt2, graph, pairs, absolute=True)
    assert [p.faithfulness for p in ours.signed.points] == pytest.approx(f_signed, abs=1e-5)
    assert [p.faithfulness for p in ours.absolute.points] == pytest.approx(f_absolute, abs=1e-5)
    assert ours.cpr == pytest.approx(cpr, abs=1e-3)
    assert ours.cmd == pytest.approx(cmd, abs=1e-3)
    assert [p.fraction for p in ours.signed.points] == list(FRACTIONS)  # x: the budgets, not what is left
    assert len({round(v, 6) for v in f_signed}) > 3  # the curve moves, so the check can fail


def test_pruned_protocol_is_the_named_alternative(gpt2):
    pairs = make_pairs(gpt2)
    graph = Graph.from_model(gpt2)
    attribute(gpt2, graph, pairs, method="eap", quiet=True)
    curve = faithfulness_curve(gpt2, graph, pairs, absolute=False, protocol="pruned")
    assert [p.fraction for p in curve.points] == [p.n_edges / graph.n_edges for p in curve.points]


def test_gqa_edges_count_as_eap_ig_ungrouped_edges(llama):
    graph = Graph.from_model(llama)
    spec = llama.spec
    assert spec.n_kv_heads < spec.n_heads
    ungrouped = Graph(ModelSpec(**{**spec.__dict__, "n_kv_heads": spec.n_heads}))
    assert int(mib_edge_weights(graph).sum()) == ungrouped.n_edges
    pairs = make_pairs(llama)
    attribute(llama, graph, pairs, method="eap", quiet=True)
    with pytest.warns(CircuitsWarning, match="approximates MIB's curve"):
        curve = faithfulness_curve(llama, graph, pairs, absolute=True)
    assert [p.fraction for p in curve.points] == list(FRACTIONS)
    scored = Graph.from_model(llama, ungrouped=True)  # MIB's own edges: no approximation, no warning
    attribute(llama, scored, pairs, method="eap", quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CircuitsWarning)
        exact = faithfulness_curve(llama, scored, pairs, absolute=True)
    assert exact.full == pytest.approx(curve.full) and int(mib_edge_weights(scored).max()) == 1
    weights = mib_edge_weights(graph)
    assert int(weights.max()) == spec.n_heads // spec.n_kv_heads
    for fraction in FRACTIONS:
        budget = int(fraction * ungrouped.n_edges)
        chosen = top_budget(graph, budget, prune=False).in_graph
        assert int(weights[chosen].sum()) <= budget < int(weights[chosen].sum()) + int(weights.max())


def test_submission_folders_round_trip(tmp_path, llama):
    from circuits.evaluation.submissions import (
        SUBMISSION_PERCENTAGES,
        read_submission,
        write_circuits,
        write_importances,
    )

    graph = Graph.from_model(llama, ungrouped=True)  # MIB's graph of a grouped-query model
    attribute(llama, graph, make_pairs(llama), method="eap", quiet=True)
    path = write_importances(graph, tmp_path / "scores", "ioi", "tiny-llama")
    assert path == tmp_path / "scores" / "ioi_tiny-llama" / "importances.json"
    data = json.loads(path.read_text())
    assert data["score_sign"] == "loss"  # MIB's: helpful edges positive
    assert data["edges"]["input->a1.h3<k>"]["score"] == -float(
        graph.scores[graph.edge_index("input->a1.h3<k>")]
    )
    back = read_submission(path.parent)
    assert isinstance(back, Graph) and torch.equal(back.scores, graph.scores)
    del data["score_sign"]  # a file from MIB's own pipeline says nothing: read in MIB's sign
    path.write_text(json.dumps(data))
    assert torch.equal(read_submission(path.parent).scores, graph.scores)
    for kind in ("json", "pt"):
        paths = write_circuits(graph, tmp_path / kind, "ioi", "tiny-llama", kind=kind)
        assert len(paths) == len(SUBMISSION_PERCENTAGES) == 9
        circuits = read_submission(paths[0].parent)
        assert isinstance(circuits, list)
        weights = mib_edge_weights(graph)
        total = int(weights.sum())
        for percent, circuit in zip(SUBMISSION_PERCENTAGES, circuits):
            size = int(weights[circuit.in_graph & circuit.valid].sum())
            assert size <= percent / 100 * total
        biggest = top_budget(graph, int(0.5 * total), absolute=False)
        assert torch.equal(circuits[-1].in_graph & graph.valid, biggest.in_graph & graph.valid)
    data = json.loads((tmp_path / "json" / "ioi_tiny-llama" / "circuit_50.json").read_text())
    assert all(set(edge) == {"in_graph"} for edge in data["edges"].values())  # MIB: no scores


def test_mibs_signed_curve_of_our_importance_file_is_our_cpr(tmp_path, gpt2):
    """MIB ranks an importance file's scores highest first (EAP-IG's apply_topn, absolute=False). Done
    here on the file's raw numbers, its curve is the CPR `mib_scores` reports; read as our own sign, it
    would take the most harmful edges first."""
    from circuits.evaluation.submissions import write_importances
    from circuits.selection.pruning import with_edges

    pairs = make_pairs(gpt2)
    graph = Graph.from_model(gpt2)
    attribute(gpt2, graph, pairs, method="eap", quiet=True)
    ours = mib_scores(gpt2, graph, pairs, resamples=0).cpr
    data = json.loads(write_importances(graph, tmp_path, "ioi", "gpt2").read_text())

    def cpr_from_file(sign: float) -> float:
        names = sorted(data["edges"], key=lambda e: -sign * data["edges"][e]["score"])  # highest first
        circuits = []
        for fraction in FRACTIONS:
            chosen = torch.zeros_like(graph.valid)
            for name in names[: int(fraction * len(names))]:
                chosen[graph.edge_index(name)] = True
            circuits.append(with_edges(graph, chosen, prune=True))
        f = [r.faithfulness for r in evaluate_many(gpt2, circuits, pairs)]
        return sum((b - a) * (fa + fb) / 2 for a, b, fa, fb in zip(FRACTIONS, FRACTIONS[1:], f, f[1:]))

    assert cpr_from_file(1.0) == pytest.approx(ours, abs=1e-4)
    assert abs(cpr_from_file(-1.0) - ours) > 0.1  # the other orientation: another curve


def test_submission_checks(tmp_path, llama):
    from circuits.errors import FileFormatError, InputError
    from circuits.evaluation.submissions import read_submission, write_circuits, write_importances

    with pytest.raises(InputError, match="ungrouped=True"):  # a grouped graph's names are not MIB's
        write_importances(Graph.from_model(llama), tmp_path, "ioi", "llama3")
    graph = Graph.from_model(llama, ungrouped=True)
    with pytest.raises(InputError, match="underscore"):
        write_circuits(graph, tmp_path, "arc_easy", "llama3")
    graph.scores = torch.randn(graph.valid.shape)
    paths = write_circuits(graph, tmp_path, "ioi", "llama3")
    paths[0].unlink()
    with pytest.raises(FileFormatError, match="8 circuit files"):
        read_submission(paths[0].parent)
    full = graph.copy()
    full.in_graph = graph.valid.clone()
    full.to_json(paths[0], scores=False)
    with pytest.raises(FileFormatError, match="do not fit MIB's budgets"):
        read_submission(paths[0].parent)
