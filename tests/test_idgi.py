"""IDGI (Yang et al. 2023): the helper against a few-line implementation on a quadratic form, feature by
feature; completeness at m = 2 in token IG and neuron IG; refused where it is undefined (edge scores)."""

import pytest
import torch

from circuits import Graph, attribute
from circuits.errors import InputError
from circuits.neurons import neuron_ig
from circuits.quadrature import idgi
from circuits.steering import token_ig
from tests.pairs import make_pairs


def test_idgi_matches_a_hand_loop_on_a_quadratic_form():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    x0, x1 = (
        torch.randn(6, generator=gen, dtype=torch.float64),
        torch.randn(6, generator=gen, dtype=torch.float64),
    )

    def f(x):
        return x @ a @ x + b @ x

    m = 5
    points = [x0 + k / m * (x1 - x0) for k in range(m + 1)]
    expected = torch.zeros(6, dtype=torch.float64)
    for k in range(m):  # the paper's rule, written out: gradient direction only, exact step change
        g = (a + a.T) @ points[k] + b
        expected += g**2 / (g**2).sum() * (f(points[k + 1]) - f(points[k]))
    grads = torch.stack([(a + a.T) @ p + b for p in points[:m]])
    got = idgi(grads, torch.stack([f(p) for p in points]))
    torch.testing.assert_close(got, expected)
    assert float(got.sum()) == pytest.approx(float(f(x1) - f(x0)), rel=1e-12)


def test_idgi_credits_a_feature_that_does_not_move():
    """Why `attribute` refuses IDGI (docs/design.md section 4): the shares follow the gradient alone."""
    x0, x1 = torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)

    def f(x):
        return x[0] * x[1]  # grad (x1, x0): feature 1 never moves yet has a gradient

    m = 4
    points = [x0 + k / m * (x1 - x0) for k in range(m + 1)]
    grads = torch.stack([torch.stack([p[1], p[0]]) for p in points[:m]])
    got = idgi(grads, torch.stack([f(p) for p in points]))
    assert float(got[1]) > 0.01  # straight-path IG gives it exactly 0
    assert float(got.sum()) == pytest.approx(2.0)


def test_token_idgi_is_complete_at_two_steps(tiny):
    result = token_ig(
        tiny,
        "When Mary and John went to the store, John gave a drink to",
        target=" Mary",
        steps=2,
        quadrature="idgi",
    )
    assert abs(result.delta) > 1e-3
    assert result.relative_error < 1e-5
    plain = token_ig(
        tiny,
        "When Mary and John went to the store, John gave a drink to",
        target=" Mary",
        steps=2,
        quadrature="left",
    )
    assert plain.relative_error > 10 * result.relative_error  # two left steps are far from complete


def test_neuron_idgi_is_complete_per_layer_at_two_steps(tiny):
    prompts, targets = ["When Mary and John went to the store, John gave a drink to"], [" Mary"]
    result = neuron_ig(tiny, prompts, targets, steps=2, quadrature="idgi", quiet=True)
    scale = float(result.prob_delta.abs().max())
    assert scale > 0 and float(result.abs_error.max()) < 1e-5 * scale
    with pytest.raises(InputError, match="IDGI has none"):
        neuron_ig(tiny, prompts, targets, steps=2, quadrature="idgi", compat="ircan-code", quiet=True)


def test_edge_scores_refuse_idgi(llama):
    with pytest.raises(InputError, match="no IDGI edge score"):
        attribute(llama, Graph.from_model(llama), make_pairs(llama), quadrature="idgi", quiet=True)
