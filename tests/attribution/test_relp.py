"""RelP (Jafari et al. 2025): against EAP with the rules off, against a hand-written detach-based reference
model with them on, and LRP's conservation where the rules make the backward linear."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from circuits import Graph, attribute
from circuits.attribution import RelPRules
from circuits.errors import InputError, UnsupportedModelError
from circuits.models import HookedModel, load_model
from circuits.testing import tiny_gpt2_hf, tiny_tokenizer
from tests import brute_force
from tests.architectures import ARCHITECTURES
from tests.pairs import make_pairs

OFF = RelPRules(ln=False, identity=False, half=False, cp=False)


def _matrix_model(name: str) -> HookedModel:
    """olmo2: grouped-query attention with q/k norms over all heads (their scales frozen by the LN rule
    too); youtu: multi-head latent attention (its latent norms frozen inside the heads' input pull-back)."""
    arch = next(a for a in ARCHITECTURES if a.name == name)
    return load_model(arch.build(), tiny_tokenizer())


def _edges(model: HookedModel, graph: Graph, pairs, **options: Any) -> torch.Tensor:
    scores = attribute(model, graph, pairs, quiet=True, **options).edge_scores
    assert scores is not None
    return scores


def test_relp_with_every_rule_off_is_eap(layout):
    graph, pairs = Graph.from_model(layout), make_pairs(layout)
    eap = attribute(layout, graph, pairs, method="eap", quiet=True)
    relp = attribute(layout, graph, pairs, method="relp", rules=OFF, quiet=True)
    torch.testing.assert_close(relp.edge_scores, eap.edge_scores, rtol=0, atol=1e-7)


def test_relp_on_a_linear_mlp_without_the_ln_rule_is_eap():
    """GPT-2 with a linear activation: the identity rule's slope h / z is 1, so RelP is EAP exactly."""
    hf = tiny_gpt2_hf()
    hf.config.activation_function = "linear"
    for block in hf.transformer.h:
        block.mlp.act = nn.Identity()
    model = load_model(hf, tiny_tokenizer())
    graph, pairs = Graph.from_model(model), make_pairs(model)
    eap = attribute(model, graph, pairs, method="eap", quiet=True)
    relp = attribute(model, graph, pairs, method="relp", rules=RelPRules(ln=False), quiet=True)
    torch.testing.assert_close(relp.edge_scores, eap.edge_scores, rtol=0, atol=1e-7)


# ----------------------------------------------------------------- the detach-based reference model
def _ln_rule_forward(norm: nn.Module):
    """The norm, its scale detached: LayerNorm (weight, bias) or an RMSNorm (weight, variance_epsilon)."""
    if isinstance(norm, nn.LayerNorm):

        def forward(x):
            c = x - x.mean(-1, keepdim=True)
            return (
                c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + norm.eps).detach() * norm.weight + norm.bias
            )

    else:

        def forward(x):
            r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).detach()
            return norm.weight * (x.float() * r).to(x.dtype)

    return forward


def _identity_rule_forward(act: nn.Module):
    plain = act.forward
    return lambda x: x * (plain(x) / x).detach()


def _half_rule_forward(mlp: Any):
    def forward(x):
        a, u = mlp.act_fn(mlp.gate_proj(x)), mlp.up_proj(x)
        return mlp.down_proj(0.5 * (a * u.detach() + a.detach() * u))

    return forward


@contextlib.contextmanager
def _reference(model: HookedModel, rules: RelPRules) -> Iterator[list]:
    """Patch the Hugging Face modules behind the bridge with the rules written out by hand; yields the
    hooks that detach the bridge's own norm scales (where it normalises itself) and, for CP, the pattern."""
    patched: list[nn.Module] = []
    hooks = []
    for name, module in model.bridge.named_modules():
        original = getattr(module, "original_component", None)
        if original is None or name.endswith("_original_component"):
            continue
        is_norm = isinstance(original, nn.LayerNorm) or type(original).__name__.endswith("RMSNorm")
        if rules.ln and is_norm:
            original.forward = _ln_rule_forward(original)
            patched.append(original)
        if name.endswith(".mlp"):
            act = getattr(original, "act", None) or getattr(original, "act_fn", None)
            if rules.identity and act is not None:
                act.forward = _identity_rule_forward(act)
                patched.append(act)
            if rules.half and hasattr(original, "gate_proj"):
                original.forward = _half_rule_forward(original)
                patched.append(original)
    if rules.ln:
        hooks += [(n, lambda s: s.detach()) for n in model.bridge.hook_dict if n.endswith("hook_scale")]
    if rules.cp:
        hooks += [
            (model.attn_pattern_hook(layer), lambda p: p.detach()) for layer in range(model.spec.n_layers)
        ]
    try:
        yield hooks
    finally:
        for module in patched:
            del module.forward


def _reference_scores(model: HookedModel, graph: Graph, pairs, rules: RelPRules) -> torch.Tensor:
    clean = brute_force.source_outputs(model, pairs.clean)
    corrupted = brute_force.source_outputs(model, pairs.corrupted)
    deltas = {name: corrupted[name] - clean[name] for name in clean}
    with _reference(model, rules) as hooks:
        grads = brute_force.destination_grads(model, graph, pairs, extra_hooks=hooks)
    return brute_force.gradient_scores(graph, deltas, grads).float()


@pytest.mark.parametrize(
    "rules",
    [
        RelPRules(),
        RelPRules(ln=True, identity=False, half=False),
        RelPRules(identity=True, ln=False, half=False),
        RelPRules(half=True, ln=False, identity=False),
        RelPRules(cp=True),
    ],
    ids=["default", "ln", "identity", "half", "cp"],
)
@pytest.mark.parametrize("name", ["llama", "gpt2", "olmo2", "youtu"])
def test_relp_matches_a_hand_written_detach_reference(name, rules, request):
    model = _matrix_model(name) if name in ("olmo2", "youtu") else request.getfixturevalue(name)
    graph, pairs = Graph.from_model(model), make_pairs(model)
    ours = _edges(model, graph, pairs, method="relp", rules=rules)
    want = _reference_scores(model, graph, pairs, rules)
    eap = _edges(model, graph, pairs, method="eap")
    scale = float(want.abs().max())
    assert float((ours - want).abs().max()) < 1e-4 * scale
    if rules != RelPRules(half=True, ln=False, identity=False) or name == "llama":  # GPT-2 has no gate
        assert float((ours - eap).abs().max()) > 1e-3 * scale  # the rules change the scores


def test_relp_conserves_relevance_when_the_backward_is_linear(llama):
    """Llama has no biases; with the pattern constant (CP), norms' scales constant (LN), activations
    passing relevance (identity) and the gate halving it, the backward is linear and homogeneous: the input
    embeddings' relevance sum_{p,d} e . g equals the metric itself (zero ablation: the input's score is
    -M(clean))."""
    graph, pairs = Graph.from_model(llama), make_pairs(llama)
    for level in ("node", "edge"):
        result = attribute(
            llama,
            graph,
            pairs,
            method="relp",
            rules=RelPRules(cp=True),
            ablation="zero",
            level=level,
            quiet=True,
        )
        assert result.node_scores is not None
        assert float(result.node_scores[0]) == pytest.approx(-result.metric_clean, rel=1e-4)
    plain = attribute(llama, graph, pairs, method="eap", ablation="zero", level="node", quiet=True)
    assert float(plain.node_scores[0]) != pytest.approx(-plain.metric_clean, rel=1e-2)  # not so for EAP


def test_rules_are_refused_where_they_cannot_be_placed():
    moe = next(a for a in ARCHITECTURES if a.model_type == "mixtral")
    model = load_model(moe.build(), tiny_tokenizer())
    graph, pairs = Graph.from_model(model), make_pairs(model)
    with pytest.raises(UnsupportedModelError, match="identity / half rules cannot be placed"):
        attribute(model, graph, pairs, method="relp", quiet=True)
    result = attribute(
        model, graph, pairs, method="relp", rules=RelPRules(identity=False, half=False), quiet=True
    )
    assert bool(result.edge_scores.isfinite().all())


def test_rules_need_a_backward_pass(llama):
    with pytest.raises(InputError, match="no backward pass"):
        attribute(
            llama, Graph.from_model(llama), make_pairs(llama), method="exact", rules=RelPRules(), quiet=True
        )
    with pytest.raises(InputError, match="RelPRules"):
        attribute(
            llama, Graph.from_model(llama), make_pairs(llama), method="relp", rules={"ln": True}, quiet=True
        )


def test_relp_takes_ig_steps(llama):
    """RelP's backward with EAP-IG-inputs' path: the rules-off run is plain EAP-IG."""
    graph, pairs = Graph.from_model(llama), make_pairs(llama)
    plain = attribute(llama, graph, pairs, method="eap-ig-inputs", quiet=True)
    off = attribute(llama, graph, pairs, method="eap-ig-inputs", rules=OFF, quiet=True)
    relp_ig = attribute(llama, graph, pairs, method="eap-ig-inputs", rules=RelPRules(), quiet=True)
    torch.testing.assert_close(off.edge_scores, plain.edge_scores, rtol=0, atol=1e-7)
    assert not torch.allclose(relp_ig.edge_scores, plain.edge_scores)
