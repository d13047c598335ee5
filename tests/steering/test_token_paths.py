"""Token attribution paths against independent references: the adaptive rule on functions with known
integrals, sequential IG against occlusion by forward passes, layer IG's change against a plain forward,
gradient x input against finite differences; and the faithfulness tests against hand-run forward passes."""

import math

import pytest
import torch

from circuits.errors import InputError
from circuits.steering import contrastive_token_ig, gradient_x_input, token_ig
from circuits.steering.faithfulness import rank_agreement, summarize, token_faithfulness
from circuits.steering.token_ig import TokenIGOptions, adaptive_path

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _filler(model):
    pad = model.tokenizer.pad_token_id
    return model.tokenizer.eos_token_id if pad is None else pad


def _logit(model, ids, target):
    with torch.no_grad():
        return float(model(torch.tensor([ids]))[0, -1, target])


def test_adaptive_rule_finds_a_steep_step():
    """f(alpha) = sum_j c_j tanh(k (alpha - a_j)): per-feature slopes known in closed form; a steep
    feature at 0.3 that 17 equal points miss is refined until the integrals are complete."""
    centres, weights, k = torch.tensor([0.3, 0.55, 0.8]), torch.tensor([2.0, -1.0, 0.5]), 400.0

    def slopes(alphas):
        x = alphas[:, None].double() - centres.double()
        values = (weights * torch.tanh(k * x)).sum(-1)
        return values, weights * k / torch.cosh(k * x) ** 2

    integral, delta = adaptive_path(slopes, steps=400, tolerance=1e-3, max_rows=8)
    exact = weights * (torch.tanh(k * (1 - centres)) - torch.tanh(k * -centres))
    assert delta == pytest.approx(float(exact.sum()), rel=1e-12)
    torch.testing.assert_close(integral, exact.double(), atol=2e-3 * exact.abs().sum(), rtol=0)
    coarse, _ = adaptive_path(slopes, steps=17, tolerance=1e-3, max_rows=8)  # the budget is spent at once
    assert float((coarse - exact).abs().sum()) > 0.1


def test_adaptive_token_ig_is_complete_at_the_defaults(tiny):
    result = token_ig(tiny, PROMPT, target=" Mary")
    assert abs(result.delta) > 1e-2
    assert result.relative_error < TokenIGOptions().tolerance
    assert result.scores[0] == 0  # the first position (attention sink) is not attributed
    moved = token_ig(tiny, PROMPT, target=" Mary", keep_first=False, warn=False)
    assert (moved.scores[0] == 0) == tiny.prepend_bos  # BOS stays whatever keep_first says


def test_contrastive_integrates_the_difference_on_one_path(llama):
    both = contrastive_token_ig(llama, PROMPT, " Mary", " John", quadrature="gauss-legendre", steps=8)
    pos = token_ig(llama, PROMPT, " Mary", quadrature="gauss-legendre", steps=8)
    neg = token_ig(llama, PROMPT, " John", quadrature="gauss-legendre", steps=8)
    torch.testing.assert_close(both.scores, pos.scores - neg.scores, atol=1e-5, rtol=1e-4)
    adaptive = contrastive_token_ig(llama, PROMPT, " Mary", " John")
    assert adaptive.relative_error < 0.01


def test_sequential_scores_match_occlusion_by_forward_passes(llama):
    """With the pad baseline, token t at its baseline is the prompt with t replaced by the pad token."""
    target = llama.single_token_id(" Mary")
    result = token_ig(llama, PROMPT, target=target, path="sequential", steps=48)
    ids = llama.to_ids([PROMPT])[0]
    full = _logit(llama, ids, target)
    occlusion = torch.tensor(
        [0.0]
        + [
            full - _logit(llama, [*ids[:t], _filler(llama), *ids[t + 1 :]], target)
            for t in range(1, len(ids))
        ]
    )
    assert result.token_deltas is not None
    torch.testing.assert_close(result.token_deltas, occlusion.float(), atol=1e-4, rtol=1e-4)
    scale = float(occlusion.abs().sum())
    assert float((result.scores - occlusion).abs().sum()) < 0.02 * scale
    assert result.relative_error < 0.02


def test_layer_ig_change_is_the_pad_prompt(llama):
    """At a layer's output, the baseline is the pad prompt's activations at every position: f there is the
    pad prompt's f (first token kept), from a plain forward pass."""
    target = llama.single_token_id(" Mary")
    ids = llama.to_ids([PROMPT])[0]
    result = token_ig(llama, PROMPT, target=target, layer=0)
    padded = ids[:1] + [_filler(llama)] * (len(ids) - 1)
    assert result.delta == pytest.approx(_logit(llama, ids, target) - _logit(llama, padded, target), abs=1e-4)
    assert result.relative_error < 0.01
    with pytest.raises(InputError, match="layer must be in"):
        token_ig(llama, PROMPT, target=target, layer=llama.spec.n_layers)


def test_gradient_x_input_is_the_directional_derivative(llama):
    """sum_t (e - b)_t . grad_t = d/dh f(e + h (e - b)) at h = 0, by central differences."""
    target = llama.single_token_id(" Mary")
    found = gradient_x_input(llama, PROMPT, target=target)
    ids = torch.tensor([llama.to_ids([PROMPT])[0]])
    with torch.no_grad(), llama.capture([llama.token_embed_hook]) as captured:
        llama(ids)
    e = captured[llama.token_embed_hook][0].clone()
    with torch.no_grad(), llama.capture([llama.token_embed_hook]) as captured:
        llama(torch.full_like(ids, _filler(llama)))
    base = captured[llama.token_embed_hook][0].clone()
    base[0] = e[0]
    h = 1e-3

    def f_at(x):
        with torch.no_grad(), llama.hooks([(llama.token_embed_hook, lambda _: x[None])]):
            return float(llama(ids)[0, -1, target])

    slope = (f_at(e + h * (e - base)) - f_at(e - h * (e - base))) / (2 * h)
    assert found.total == pytest.approx(slope, rel=1e-3, abs=1e-4)


def test_options_are_checked():
    with pytest.raises(InputError, match="unknown quadrature"):
        TokenIGOptions(quadrature="simpson")
    with pytest.raises(InputError, match="occlusion"):
        TokenIGOptions(path="sequential", quadrature="idgi")
    with pytest.raises(InputError, match="baseline must be"):
        TokenIGOptions(baseline="mask")  # type: ignore[arg-type]


def test_unknown_option_names_are_refused(llama):
    with pytest.raises(InputError, match=r"unknown token IG options \['step'\]"):
        token_ig(llama, PROMPT, " Mary", step=4)


def test_faithfulness_curves_are_forward_passes(llama):
    """Deletion and insertion ends and one ERASER bin, recomputed by hand from forward passes."""
    target = llama.single_token_id(" Mary")
    ids = llama.to_ids([PROMPT])[0]
    scores = torch.arange(len(ids), dtype=torch.float32)  # the last token ranks first
    found = token_faithfulness(llama, PROMPT, scores, target=target)
    n, pad = len(ids) - 1, _filler(llama)
    full, empty = _logit(llama, ids, target), _logit(llama, ids[:1] + [pad] * n, target)
    assert len(found.deletion) == len(found.insertion) == n + 1
    assert float(found.deletion[0]) == pytest.approx(full, abs=1e-4)
    assert float(found.deletion[-1]) == pytest.approx(empty, abs=1e-4)
    assert float(found.insertion[0]) == pytest.approx(empty, abs=1e-4)
    assert float(found.insertion[-1]) == pytest.approx(full, abs=1e-4)
    without_last = _logit(llama, [*ids[:-1], pad], target)
    assert float(found.deletion[1]) == pytest.approx(without_last, abs=1e-4)
    only_last = _logit(llama, ids[:1] + [pad] * (n - 1) + ids[-1:], target)
    assert float(found.insertion[1]) == pytest.approx(only_last, abs=1e-4)
    bins = sorted({min(n, math.ceil(q * n)) for q in (0.01, 0.05, 0.1, 0.2, 0.5)})
    removed = [_logit(llama, ids[: len(ids) - k] + [pad] * k, target) for k in bins]
    assert found.comprehensiveness == pytest.approx(full - sum(removed) / len(removed), abs=1e-4)
    summary = summarize([found, found], resamples=20)
    assert summary.deletion_auc.estimate == pytest.approx(found.deletion_area / found.full_change)
    assert summary.prompts == 2


def test_occlusion_order_deletes_faster_than_its_reverse(llama):
    """A faithful order (occlusion) lowers f faster under deletion than the reverse order."""
    target = llama.single_token_id(" Mary")
    occlusion = token_ig(llama, PROMPT, target=target, path="sequential", steps=16, warn=False).token_deltas
    assert occlusion is not None
    good = token_faithfulness(llama, PROMPT, occlusion, target=target)
    bad = token_faithfulness(llama, PROMPT, -occlusion, target=target)
    assert good.deletion_area < bad.deletion_area
    assert good.comprehensiveness > bad.comprehensiveness


def test_rank_agreement():
    a = torch.tensor([9.0, 1.0, 2.0, 3.0, 4.0])
    assert rank_agreement(a, a) == pytest.approx(1.0)
    assert rank_agreement(a, -a) == pytest.approx(-1.0)
    assert rank_agreement(a, torch.tensor([-5.0, 1.0, 2.0, 3.0, 4.0])) == pytest.approx(1.0)  # first ignored
