"""Bootstrap intervals against the normal approximation they must match when f is a plain mean, a
re-implementation with the same draws, and circuit stability where every resample is the same data."""

from __future__ import annotations

import math

import pytest
import torch

from circuits import Graph, attribute
from circuits.attribution import ScoringOptions
from circuits.errors import InputError
from circuits.evaluation import Evaluation
from circuits.evaluation.curves import CurvePoint, FaithfulnessCurve, mib_scores
from circuits.evaluation.intervals import (
    circuit_stability,
    curve_intervals,
    faithfulness_interval,
    jaccard,
    resample_indices,
)
from tests.pairs import make_pairs


def _evaluation(circuit: torch.Tensor, full: torch.Tensor, empty: torch.Tensor) -> Evaluation:
    return Evaluation(circuit, float(circuit.mean()), float(full.mean()), float(empty.mean()), full, empty)


def test_the_interval_of_a_mean_is_the_normal_one():
    """full = 1, empty = 0 everywhere: f is the mean of M(C), with 95% interval mean -+ 1.96 s / sqrt(N)."""
    n = 4000
    circuit = torch.randn(n, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    interval = faithfulness_interval(_evaluation(circuit, torch.ones(n), torch.zeros(n)), resamples=4000)
    half = 1.96 * float(circuit.std()) / math.sqrt(n)
    assert interval.estimate == pytest.approx(float(circuit.mean()))
    assert interval.low == pytest.approx(interval.estimate - half, abs=0.1 * half)
    assert interval.high == pytest.approx(interval.estimate + half, abs=0.1 * half)


def test_the_interval_is_the_percentiles_of_the_resampled_ratio():
    gen = torch.Generator().manual_seed(2)
    circuit, full, empty = (torch.randn(50, generator=gen) + k for k in (1.0, 3.0, 0.0))
    interval = faithfulness_interval(_evaluation(circuit, full, empty), resamples=500, seed=7)
    draws = resample_indices(50, 500, seed=7)
    c, f, e = (t.double().tolist() for t in (circuit, full, empty))
    mean = lambda values, d: sum(values[i] for i in d) / len(d)  # noqa: E731
    ratios = sorted((mean(c, d) - mean(e, d)) / (mean(f, d) - mean(e, d)) for d in draws.tolist())

    # numpy's default "linear" percentile: position q * (R - 1) between order statistics
    def percentile(q: float) -> float:
        pos = q * (len(ratios) - 1)
        lo = math.floor(pos)
        return ratios[lo] + (pos - lo) * (ratios[min(lo + 1, len(ratios) - 1)] - ratios[lo])

    assert interval.low == pytest.approx(percentile(0.025), rel=1e-9)
    assert interval.high == pytest.approx(percentile(0.975), rel=1e-9)
    again = faithfulness_interval(_evaluation(circuit, full, empty), resamples=500, seed=7)
    assert again == interval  # seeded


def test_curve_areas_of_two_points():
    """Two points at x = 0 and 1 with full = 1, empty = 0: CPR = (mean C0 + mean C1) / 2, a plain mean."""
    n = 3000
    gen = torch.Generator().manual_seed(3)
    c0, c1 = torch.randn(n, generator=gen), torch.randn(n, generator=gen) + 1
    points = [CurvePoint(1, 1, 0.0, 0.0, float(c0.mean())), CurvePoint(100, 9, 1.0, 0.0, float(c1.mean()))]
    curve = FaithfulnessCurve("t", False, 1.0, 0.0, points, torch.ones(n), torch.zeros(n), [c0, c1])
    under, _ = curve_intervals(curve, resamples=3000)
    half = 1.96 * float(((c0 + c1) / 2).std()) / math.sqrt(n)
    assert under.estimate == pytest.approx(float((c0.mean() + c1.mean()) / 2))
    assert under.high - under.low == pytest.approx(2 * half, rel=0.1)


def test_bad_bootstrap_requests_are_refused():
    with pytest.raises(InputError, match="resamples"):
        resample_indices(10, 0)
    with pytest.raises(InputError, match="at least 2"):
        resample_indices(1, 10)


def test_mib_scores_carry_intervals(llama):
    pairs = make_pairs(llama).repeat(2)
    graph = Graph.from_model(llama)
    attribute(llama, graph, pairs, method="eap", quiet=True)
    scores = mib_scores(llama, graph, pairs, percentages=(10, 50, 100), resamples=200, quiet=True)
    assert scores.cpr_interval is not None and scores.cmd_interval is not None
    assert scores.cpr_interval.low <= scores.cpr <= scores.cpr_interval.high
    assert scores.cmd_interval.estimate == scores.cmd
    assert "per_example" not in scores.signed.to_dict()  # JSON-ready


def test_a_circuit_is_stable_when_every_resample_is_the_same_data(llama):
    pairs = make_pairs(llama).take(torch.zeros(4, dtype=torch.long))  # one pair, four times
    graph = Graph.from_model(llama)
    attribute(llama, graph, pairs, method="eap", quiet=True)
    circuit = graph.top_n(30)
    same = circuit_stability(llama, circuit, pairs, scoring=ScoringOptions("eap"), n_edges=30, resamples=3)
    assert same.to_full.tolist() == [1.0, 1.0, 1.0] and same.pairwise == 1.0
    mixed = circuit_stability(
        llama, circuit, make_pairs(llama).repeat(2), scoring=ScoringOptions("eap"), n_edges=30, resamples=3
    )
    assert 0.0 <= mixed.mean <= 1.0


def test_jaccard():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    assert jaccard(a, b) == pytest.approx(1 / 3) and jaccard(a, a) == 1.0


def test_sign_consistency_keeps_the_edges_whose_sign_holds():
    from circuits.evaluation.intervals import sign_consistent
    from circuits.testing import tiny_llama

    graph = Graph.from_model(tiny_llama())
    graph.scores = torch.randn(graph.scores.shape, generator=torch.Generator().manual_seed(0))
    resampled = graph.scores[None].repeat(10, 1, 1)
    resampled[:2] *= -1  # every edge flips in 2 of 10 resamples: agreement 0.8
    resampled[:, 0, 0] = graph.scores[0, 0]  # one edge always agrees
    kept = sign_consistent(graph, resampled, agreement=0.8).scores
    assert torch.equal(kept, graph.scores)  # 0.8 >= 0.8 everywhere
    strict = sign_consistent(graph, resampled, agreement=0.9).scores
    assert strict[0, 0] == graph.scores[0, 0] and int((strict != 0).sum()) == 1
    assert torch.equal(graph.scores, resampled[5])  # the caller's graph is not changed
    with pytest.raises(InputError, match="agreement"):
        sign_consistent(graph, resampled, agreement=0)
