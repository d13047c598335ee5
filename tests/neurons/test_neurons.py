"""Neuron IG: completeness, cached == full-sequence path, the released IRCAN weighting by hand; selection;
reversible reweighting; bad inputs."""

import pytest
import torch

from circuits.neurons import context_neurons, neuron_ig, random_neurons_like, reweight, select_neurons
from circuits.neurons.ig import last_activations

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "Then Tom said hello to"]
TARGETS = [" Mary", " Tom"]


def test_completeness_per_layer(tiny):
    result = neuron_ig(tiny, PROMPTS, TARGETS, steps=64, quadrature="gauss-legendre", quiet=True)
    scale = result.prob_delta.abs().max()
    assert scale > 0
    assert float(result.abs_error.max()) < 1e-3 * float(scale)


def test_cached_path_equals_full_sequence_path(tiny):
    baseline = last_activations(tiny, ["Then Anna said hello to", "Then Bob said hello to"])
    kwargs = {"baseline": baseline, "steps": 7, "quiet": True, "max_rows": 5}  # several row chunks
    cached = neuron_ig(tiny, PROMPTS, TARGETS, **kwargs)
    full = neuron_ig(tiny, PROMPTS, TARGETS, implementation="full", **kwargs)
    scale = float(full.scores.abs().max())
    assert float((cached.scores - full.scores).abs().max()) <= 1e-5 * scale


def test_ircan_code_weighting_by_hand(llama):
    """The released code: the gradient with respect to the endpoint a_in of a(alpha) = alpha a_in."""
    m, layer = 4, 1
    result = neuron_ig(
        llama, PROMPTS[:1], TARGETS[:1], steps=m, compat="ircan-code", layers=[layer], quiet=True
    )
    a_in = last_activations(llama, PROMPTS[:1])[0, layer]
    ids = torch.tensor(llama.to_ids(PROMPTS[:1]))
    target = llama.single_token_id(TARGETS[0])
    total = torch.zeros_like(a_in)
    for k in range(m):
        endpoint = a_in.clone().requires_grad_(True)

        def patch(x, endpoint=endpoint, alpha=k / m):
            x = x.clone()
            x[:, -1] = alpha * endpoint
            return x

        with llama.hooks([(llama.mlp_post_hook(layer), patch)]), torch.enable_grad():
            prob = llama(ids)[0, -1].softmax(-1)[target]
            (grad,) = torch.autograd.grad(prob, endpoint)
        total += grad
    expected = a_in * total / m
    torch.testing.assert_close(result.scores[0, layer], expected, rtol=1e-4, atol=1e-9)


def test_select_neurons_by_hand():
    scores = torch.zeros(3, 2, 4)
    scores[0, 0, 1], scores[0, 1, 2], scores[0, 1, 3] = 1.0, 0.5, 0.05  # 0.05 < 0.1 x max: dropped
    scores[1, 1, 2], scores[1, 0, 0] = 2.0, 1.0
    scores[2, 1, 2] = 1.0
    neurons, counts = select_neurons(scores, threshold=0.1, per_example=2)
    assert neurons.tolist() == [[1, 2], [0, 0], [0, 1]] or neurons.tolist() == [[1, 2], [0, 1], [0, 0]]
    assert counts.tolist() == [3, 1, 1]
    assert [1, 3] not in neurons.tolist()


def test_reweight_is_reversible_and_zero_erases(llama):
    ids = torch.tensor(llama.to_ids(PROMPTS[:1]))
    neurons = torch.tensor([[0, 3], [1, 5], [1, 7]])
    with torch.no_grad():
        before = llama(ids)
        with reweight(llama, neurons, 0.0):
            erased = llama(ids)

        def zero(x):
            x = x.clone()
            x[..., [5, 7]] = 0
            return x

        def zero0(x):
            x = x.clone()
            x[..., 3] = 0
            return x

        with llama.hooks([(llama.mlp_post_hook(0), zero0), (llama.mlp_post_hook(1), zero)]):
            manual = llama(ids)
        after = llama(ids)
    assert torch.equal(before, after)
    assert not torch.allclose(before, erased)
    torch.testing.assert_close(erased, manual)
    control = random_neurons_like(neurons, llama.spec.d_mlp)
    assert sorted(control[:, 0].tolist()) == [0, 1, 1]


def test_context_neurons_runs_and_bad_inputs(llama):
    found = context_neurons(
        llama, PROMPTS, ["John gave a drink to", "said hello to"], TARGETS, steps=3, quiet=True
    )
    assert found.top(2).shape == (2, 2)
    with pytest.raises(ValueError, match="empty"):
        context_neurons(llama, [], [], [])
    with pytest.raises(ValueError, match="target 0"):
        neuron_ig(llama, PROMPTS[:1], [" Marygold and more"], quiet=True)
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        neuron_ig(llama, PROMPTS, TARGETS[:1], quiet=True)
    with pytest.raises(ValueError, match="baseline must have shape"):
        neuron_ig(llama, PROMPTS, TARGETS, baseline=torch.zeros(3), quiet=True)
    with pytest.raises(ValueError, match=r"neurons must be \[k, 2\]"), reweight(llama, torch.zeros(3), 2.0):
        pass


def test_target_probability_gradient():
    from circuits.neurons.ig import TargetProbability

    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, dtype=torch.float64)
    targets = torch.tensor([2, 0, 6])
    p = TargetProbability.apply(logits * 1.0, targets)  # a non-leaf copy: the backward reuses its storage
    (ours,) = torch.autograd.grad(p, logits, weights)
    expected = logits.softmax(-1).gather(1, targets[:, None])[:, 0]
    (reference,) = torch.autograd.grad(expected, logits, weights)
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(ours, reference)


def test_cached_path_refuses_a_block_it_cannot_reproduce():
    """A block whose MLP output is transformed before the residual sum (as with a post-MLP norm) breaks the
    one-position route's assumption; the check must say so instead of returning wrong scores."""
    from circuits.models.last_position import PREFIX_ROWS
    from circuits.models.plain import plain_model
    from circuits.testing import tiny_llama

    model = tiny_llama()  # its own copy: the hooks below must not leak into other tests
    top = model.spec.n_layers - 1
    neuron_ig(model, PROMPTS[:1], TARGETS[:1], steps=2, quiet=True)  # fine as built
    handles = [
        plain_model(model, attention).model.layers[top].mlp.register_forward_hook(lambda m, a, out: out.abs())
        for attention in (None, PREFIX_ROWS)
    ]
    try:
        with pytest.raises(RuntimeError, match="MLP output added to the residual False"):
            neuron_ig(model, PROMPTS[:1], TARGETS[:1], steps=2, quiet=True)
        full = neuron_ig(model, PROMPTS[:1], TARGETS[:1], steps=2, implementation="full", quiet=True)
        assert full.scores.abs().sum() > 0
    finally:
        for h in handles:
            h.remove()


def test_prompts_padded_together_equal_prompts_alone(tiny):
    """`run_prompts` pads on the right; causal attention keeps each prompt's states as when run alone."""
    together = last_activations(tiny, PROMPTS)
    alone = torch.cat([last_activations(tiny, [p]) for p in PROMPTS])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_activation_difference_neurons_by_hand(llama):
    """IRCAN's gradient-free control: the neurons whose last-position activation rises most with context,
    recomputed from hooks on separate forward passes."""
    from circuits.neurons import activation_difference_neurons

    without = ["John gave a drink to", "said hello to"]
    names = [llama.mlp_post_hook(layer) for layer in range(llama.spec.n_layers)]

    def last(prompt):
        with torch.no_grad(), llama.capture(names) as captured:
            llama(torch.tensor(llama.to_ids([prompt])))
        return torch.stack([captured[name][0, -1] for name in names])

    rise = sum(last(a) - last(b) for a, b in zip(PROMPTS, without)) / 2
    found = activation_difference_neurons(llama, PROMPTS, without, 5)
    expected = rise.flatten().topk(5).indices
    d_mlp = llama.spec.d_mlp
    assert found.tolist() == [[int(i) // d_mlp, int(i) % d_mlp] for i in expected]
    with pytest.raises(ValueError, match="h must lie"):
        activation_difference_neurons(llama, PROMPTS, without, 0)
