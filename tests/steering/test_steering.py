"""Token IG (completeness, contrastive = difference, logit form), PCA sign, norm-preserving steering."""

import pytest
import torch

from circuits.steering import (
    contrastive_token_ig,
    generate,
    pc1_aligned,
    steer,
    steering_vectors,
    token_embeddings,
    token_ig,
)

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.mark.parametrize("form", ["continuation", "target"])
def test_token_ig_completeness(tiny, form):
    options: dict[str, object] = (
        {"continuation": " Mary said"} if form == "continuation" else {"target": " Mary"}
    )
    if tiny.spec.name.startswith("tiny-llama"):  # RMSNorm: start from a real embedding, not from zero
        n = len(tiny.to_ids([PROMPT])[0])
        options["baseline"] = token_embeddings(tiny, [tiny.single_token_id(" the")] * n)
    result = token_ig(tiny, PROMPT, steps=64, quadrature="gauss-legendre", **options)
    assert abs(result.delta) > 1e-3
    assert result.relative_error < 1e-3
    assert len(result.tokens) == len(result.scores) == len(tiny.to_ids([PROMPT])[0])
    assert "<span" in result.to_html() and result.render()


def test_contrastive_is_difference_of_separate_attributions(llama):
    both = contrastive_token_ig(llama, PROMPT, " Mary", " John", steps=8)
    pos, neg = token_ig(llama, PROMPT, " Mary", steps=8), token_ig(llama, PROMPT, " John", steps=8)
    torch.testing.assert_close(both.scores, pos.scores - neg.scores)
    assert both.delta == pytest.approx(pos.delta - neg.delta)


def test_grains_code_off_by_one_scores_a_different_function(llama):
    ours = token_ig(llama, PROMPT, " Mary", steps=8)
    released = token_ig(llama, PROMPT, " Mary", steps=8, compat="grains-code")
    assert not torch.allclose(ours.scores, released.scores)


def test_pc1_sign_follows_the_mean():
    gen = torch.Generator().manual_seed(0)
    direction = torch.tensor([3.0, -1.0, 0.5])
    diffs = torch.randn(40, 3, generator=gen) * 0.1 + torch.linspace(0.5, 2.0, 40)[:, None] * direction
    pc = pc1_aligned(diffs)
    assert float(pc @ diffs.mean(0)) > 0
    torch.testing.assert_close(pc, direction / direction.norm(), atol=0.05, rtol=0)
    assert float(pc1_aligned(-diffs) @ (-diffs).mean(0)) > 0


def test_steering_preserves_norms_and_is_removed(llama):
    vectors = steering_vectors(
        llama,
        [(PROMPT, " Mary", " John"), ("Then Tom said hello to", " Tom", " Anna")],
        [0, 1],
        k=2,
        steps=4,
        quiet=True,
    )
    assert set(vectors.vectors) == {0, 1}
    ids = torch.tensor(llama.to_ids([PROMPT]))
    seen = {}

    def grab(name):
        def hook(x):
            seen[name] = x.detach().clone()

        return hook

    names = [llama.resid_post_hook(1)]
    with torch.no_grad():
        with llama.hooks([(n, grab(n + ":plain")) for n in names]):
            before = llama(ids)
        with steer(llama, vectors, 8.0, layers=[1]), llama.hooks([(n, grab(n + ":steered")) for n in names]):
            steered = llama(ids)
        after = llama(ids)
    plain, moved = seen[names[0] + ":plain"], seen[names[0] + ":steered"]
    torch.testing.assert_close(moved.norm(dim=-1), plain.norm(dim=-1))
    assert not torch.allclose(moved, plain) and not torch.allclose(before, steered)
    assert torch.equal(before, after)
    ids = llama.to_ids([PROMPT])[0]
    with steer(llama, vectors, 8.0, layers=[1]):
        text = generate(llama, PROMPT, max_new_tokens=3)
        with torch.no_grad():  # greedy decoding of the steered model, by hand
            for _ in range(3):
                ids.append(int(llama(torch.tensor([ids]))[0, -1].argmax()))
    assert text == llama.tokenizer.decode(ids[-3:])


def test_bad_inputs(llama):
    with pytest.raises(ValueError, match="no tokens"):
        token_ig(llama, PROMPT, "")
    with pytest.raises(ValueError, match="exactly one"):
        token_ig(llama, PROMPT)
    with pytest.raises(ValueError, match="layers must be"):
        steering_vectors(llama, [(PROMPT, " Mary", " John")], [7])
    with (
        pytest.raises(ValueError, match="no steering vector"),
        steer(llama, {0: torch.ones(64)}, 1.0, layers=[1]),
    ):
        pass


def test_zero_baseline_on_smollm2_is_finite(smollm2):
    """All-zero embeddings give non-finite gradients in SmolLM2; the endpoint used for the delta must not
    leak into the scores."""
    result = token_ig(
        smollm2, "Q: Is the sky blue?\nA:", " Yes", steps=4, quadrature="gauss-legendre", baseline="zero"
    )
    assert torch.isfinite(result.scores).all() and abs(result.delta) > 0


def test_a_path_through_the_singular_baseline_says_what_to_do(smollm2):
    """With the zero baseline the left rule evaluates alpha = 0, the zero embedding, where RMSNorm divides
    by zero: the error names the point and the two ways out."""
    from circuits.errors import NumericalError

    with pytest.raises(NumericalError, match=r"alpha = 0: .*baseline='pad'.*gauss-legendre"):
        token_ig(
            smollm2,
            "Q: Is the sky blue?\nA:",
            " Yes",
            steps=4,
            quadrature="left",
            baseline="zero",
            keep_first=False,
        )
