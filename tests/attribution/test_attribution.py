import copy

import pytest
import torch

from circuits import Graph
from circuits.attribution import attribute
from circuits.data import PromptPairs
from circuits.errors import InputError
from circuits.metrics import logit_diff
from circuits.models import load_model
from circuits.quadrature import quadrature
from circuits.testing import tiny_llama_hf, tiny_tokenizer
from tests.pairs import make_pairs
from tests.reference import reference_llama


@pytest.fixture(scope="module")
def hf_llama():
    return tiny_llama_hf(seed=7)


@pytest.fixture(scope="module")
def model7(hf_llama):
    return load_model(hf_llama, tiny_tokenizer())


def reference_metric(hf, pairs, patches=None):
    logits, _ = reference_llama(hf, pairs.clean, patches)
    return logit_diff(logits, pairs)


def test_exact_equals_brute_force_edge_patching(model7, hf_llama):
    pairs = make_pairs(model7)
    graph = Graph.from_model(model7)
    scores = attribute(model7, graph, pairs, method="exact", quiet=True).edge_scores
    with torch.no_grad():
        base = reference_metric(hf_llama, pairs)
        _, clean_src = reference_llama(hf_llama, pairs.clean)
        _, corr_src = reference_llama(hf_llama, pairs.corrupted)
        for name in [
            "input->a0.h1<q>",
            "input->a1.kv0<k>",
            "a0.h2->a1.h3<q>",
            "a0.h3->a1.kv1<v>",
            "m0->a1.h2<q>",
            "a0.h0->m0",
            "a1.h1->logits",
            "m1->logits",
            "input->m1",
        ]:
            src, dst = name.split("->")
            patched = reference_metric(hf_llama, pairs, {dst: corr_src[src] - clean_src[src]})
            r, c = graph.edge_index(name)
            assert scores[r, c] == pytest.approx(float((patched - base).mean()), abs=1e-5), name


def test_eap_equals_finite_differences(model7, hf_llama):
    """EAP's delta . grad is the directional derivative of M along the edge's activation difference."""
    pairs = make_pairs(model7)
    graph = Graph.from_model(model7)
    scores = attribute(model7, graph, pairs, method="eap", quiet=True).edge_scores
    hf64 = copy.deepcopy(hf_llama).double()

    def metric64(patches):
        logits, _ = reference_llama(hf64, pairs.clean, patches)
        last = logits[torch.arange(len(pairs)), pairs.lengths - 1]
        return (last.gather(1, pairs.answer[:, None]) - last.gather(1, pairs.distractor[:, None])).mean()

    eps = 1e-5
    with torch.no_grad():
        _, clean_src = reference_llama(hf64, pairs.clean)
        _, corr_src = reference_llama(hf64, pairs.corrupted)
        for name in [
            "input->a0.h1<q>",
            "input->a1.kv0<k>",
            "a0.h2->a1.kv1<v>",
            "m0->a1.h2<q>",
            "a0.h0->m0",
            "m1->logits",
        ]:
            src, dst = name.split("->")
            delta = corr_src[src] - clean_src[src]
            fd = float(metric64({dst: eps * delta}) - metric64({dst: -eps * delta})) / (2 * eps)
            r, c = graph.edge_index(name)
            assert float(scores[r, c]) == pytest.approx(fd, rel=1e-4, abs=1e-9), name


def test_ig_completeness_with_many_steps(tiny):
    pairs = make_pairs(tiny)
    result = attribute(
        tiny,
        Graph.from_model(tiny),
        pairs,
        method="eap-ig-inputs",
        ig_steps=256,
        quadrature="gauss-legendre",
        quiet=True,
        max_rows=256,
    )
    assert result.completeness.relative_error < 1e-3


def test_left_riemann_matches_hand_written_loop(llama):
    """EAP-IG's grid: alpha = k/m, k = 0..m-1, gradients averaged; compared on the node scores of input."""
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    m = 5
    result = attribute(llama, graph, pairs, method="eap-ig-inputs", ig_steps=m, quiet=True, level="node")
    ids, mask = pairs.clean, pairs.attention_mask
    embeds = {}
    for name, tokens in (("clean", pairs.clean), ("corrupted", pairs.corrupted)):
        with torch.no_grad(), llama.hooks([(llama.input_hook, lambda x, n=name: embeds.__setitem__(n, x))]):
            llama(tokens, mask)
    grad_sum = torch.zeros_like(embeds["clean"])
    for k in range(m):
        e = (embeds["corrupted"] + k / m * (embeds["clean"] - embeds["corrupted"])).requires_grad_(True)
        with llama.hooks([(llama.input_hook, lambda x, e=e: e)]):
            logit_diff(llama(ids, mask), pairs).sum().backward()
        grad_sum += e.grad
    expected = ((embeds["corrupted"] - embeds["clean"]) * grad_sum / m).sum() / len(pairs)
    assert result.node_scores[0] == pytest.approx(float(expected), rel=1e-5)
    alphas, weights = quadrature("left", m)
    assert alphas.tolist() == [k / m for k in range(m)] and torch.allclose(
        weights, torch.full((m,), 0.2, dtype=torch.float64)
    )


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "clean-corrupted", "eap-ig-activations", "exact"])
def test_scores_do_not_depend_on_batch_size(llama, method):
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    a = attribute(llama, graph, pairs, method=method, batch_size=1, quiet=True, ig_steps=3)
    b = attribute(llama, graph, pairs, method=method, batch_size=3, quiet=True, ig_steps=3, max_rows=4)
    assert torch.allclose(a.edge_scores, b.edge_scores, atol=1e-6, rtol=1e-4)


def test_methods_agree_with_exact_on_gpt2(gpt2):
    pairs = make_pairs(gpt2)
    graph = Graph.from_model(gpt2)
    exact = attribute(gpt2, graph, pairs, method="exact", quiet=True).edge_scores[graph.valid]
    ig = attribute(
        gpt2, graph, pairs, method="eap-ig-inputs", ig_steps=32, quadrature="gauss-legendre", quiet=True
    )
    corr = torch.corrcoef(torch.stack([ig.edge_scores[graph.valid], exact]))[0, 1]
    assert corr > 0.95
    assert graph.scores is not None and torch.equal(graph.scores, ig.edge_scores)


def test_node_level_exact_equals_ablating_all_outgoing_edges(llama):
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    nodes = attribute(llama, graph, pairs, method="exact", level="node", quiet=True).node_scores
    # Last-layer MLP has exactly one outgoing edge (to logits): node score == that edge's score.
    edges = attribute(llama, graph, pairs, method="exact", quiet=True).edge_scores
    m1 = graph.mlp_source(1)
    assert nodes[m1] == pytest.approx(float(edges[m1, graph.logits_destination]), abs=1e-6)


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_eap_with_mean_and_zero_ablation_matches_exact_direction(llama, ablation):
    pairs = make_pairs(llama)
    graph = Graph.from_model(llama)
    exact = attribute(llama, graph, pairs, method="exact", ablation=ablation, quiet=True).edge_scores[
        graph.valid
    ]
    eap = attribute(llama, graph, pairs, method="eap", ablation=ablation, quiet=True).edge_scores[graph.valid]
    assert torch.corrcoef(torch.stack([eap, exact]))[0, 1] > 0.5


def test_bad_inputs(llama):
    graph = Graph.from_model(llama)
    pairs = make_pairs(llama)
    with pytest.raises(ValueError, match="never branch"):  # the distractor continues the answer
        PromptPairs.from_ids(llama, [[5, 6, 7]], [[5, 8, 7]], [[9, 10]], [[9]])
    with pytest.raises(ValueError, match="answer of pair 0 has no tokens"):
        PromptPairs.from_ids(llama, [[5, 6, 7]], [[5, 8, 7]], [[]], [[9]])
    with pytest.raises(ValueError, match=r"empty|no prompt"):
        PromptPairs.from_strings(llama, [], [], [], [])
    with pytest.raises(ValueError, match="unknown method"):
        attribute(llama, graph, pairs, method="acdc-magic")
    with pytest.raises(ValueError, match="needs ablation='patching'"):
        attribute(llama, graph, pairs, method="eap-ig-inputs", ablation="mean")
    with pytest.raises(ValueError, match="one value per example"):
        attribute(
            llama, graph, pairs, metric=lambda logits, p, c=None: logits.sum(), method="eap", quiet=True
        )
    from circuits.graph import GraphMismatchError
    from circuits.models import ModelSpec

    with pytest.raises(GraphMismatchError):
        attribute(llama, Graph.from_model(ModelSpec(3, 4, 2, 64, 16, 128)), pairs)


def test_hand_built_circuit_is_ranked_first():
    """Only head a1.h0 writes to the residual stream (other heads' W_O and every MLP's down projection are
    zeroed), so the behaviour runs through a known handful of edges."""
    hf = tiny_llama_hf(seed=11)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.down_proj.weight.zero_()
        hf.model.layers[0].self_attn.o_proj.weight.zero_()
        hf.model.layers[1].self_attn.o_proj.weight[:, 16:].zero_()  # keep head 0 (d_head 16)
        hf.model.layers[1].self_attn.q_proj.weight.mul_(8)  # make the attention pattern matter
        hf.model.layers[1].self_attn.k_proj.weight.mul_(8)
    model = load_model(hf, tiny_tokenizer())
    pairs = make_pairs(model)
    # The corruption changes one name, not the last token, so the input reaches the metric only through
    # a1.h0's keys and values (its query and the direct input->logits path see the unchanged last token).
    known = {"input->a1.kv0<k>", "input->a1.kv0<v>", "a1.h0->logits"}
    for method in ["exact", "eap-ig-inputs", "eap"]:
        graph = Graph.from_model(model)
        scores = attribute(model, graph, pairs, method=method, quiet=True).edge_scores
        top = set(graph.top_n(len(known)).edge_names(graph.top_n(len(known)).in_graph))
        assert top == known, method
        rest = scores.clone()
        for name in known:
            rest[graph.edge_index(name)] = 0
        assert rest.abs().max() < 1e-6, method  # zero up to float32 rounding of the metric


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "clean-corrupted", "eap-ig-activations"])
def test_edge_level_node_scores_equal_node_level(layout, method):
    """At edge level node scores are edge sums over destinations; at node level they come from the
    gradients at the sources' outputs: every read of the residual stream being a destination, they agree."""
    tiny = layout
    pairs = make_pairs(tiny)
    kwargs = {"method": method, "ig_steps": 3, "quiet": True}
    by_edges = attribute(tiny, Graph.from_model(tiny), pairs, level="edge", **kwargs).node_scores
    direct = attribute(tiny, Graph.from_model(tiny), pairs, level="node", **kwargs).node_scores
    torch.testing.assert_close(by_edges, direct, rtol=1e-4, atol=1e-5 * float(direct.abs().max()))


@pytest.mark.parametrize("subtract", [False, True])
def test_source_recording_layouts_agree(tiny, subtract):
    """Head results computed straight into source-major storage equal the generic per-head write."""
    from circuits.sources import SourceOutputs, source_buffer, source_hooks

    pairs = make_pairs(tiny)
    graph = Graph.from_model(tiny)
    b, p = pairs.clean.shape
    fast = source_buffer(graph, b, p, tiny.device)
    generic = torch.zeros(b, p, graph.n_sources, graph.spec.d_model)
    start = torch.randn(b, p, graph.n_sources, graph.spec.d_model)
    fast.copy_(start)
    generic.copy_(start)
    for out in (fast, generic):
        outputs = SourceOutputs.of(out)
        with torch.no_grad(), tiny.hooks(source_hooks(tiny, graph, outputs, subtract=subtract)):
            tiny(pairs.clean, pairs.attention_mask)
    assert not torch.equal(fast, start)
    torch.testing.assert_close(fast, generic, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "exact"])
@pytest.mark.parametrize("metric", ["logit_diff", "kl"])
def test_last_position_shortcut_matches_full_logits(tiny, method, metric):
    """A metric marked `last_position` gets logits unembedded at the last real positions only; the same
    metric seen as an unmarked callable gets every position: the scores agree."""
    from circuits.metrics import METRICS

    pairs = make_pairs(tiny)
    kwargs = {"method": method, "ig_steps": 3, "quiet": True}
    if (method, metric) == ("eap", "kl"):  # KL's gradient vanishes at the clean run, EAP's only point
        with pytest.raises(InputError, match="zero gradient at the clean run"):
            attribute(tiny, Graph.from_model(tiny), pairs, metric=metric, **kwargs)
        return

    def unmarked(logits, pairs, clean_logits=None):
        assert logits.shape[1] == pairs.n_positions
        return METRICS[metric](logits, pairs, clean_logits)

    short = attribute(tiny, Graph.from_model(tiny), pairs, metric=metric, **kwargs)
    full = attribute(tiny, Graph.from_model(tiny), pairs, metric=unmarked, **kwargs)
    torch.testing.assert_close(short.edge_scores, full.edge_scores, rtol=1e-4, atol=1e-6)
    assert short.metric_clean == pytest.approx(full.metric_clean, rel=1e-5, abs=1e-7)


def test_the_method_names_are_the_registrys():
    import typing

    from circuits.attribution import DEFAULT_METHOD, METHODS, MethodName

    assert set(typing.get_args(MethodName)) == set(METHODS)
    assert DEFAULT_METHOD in METHODS
    assert {name for name, spec in METHODS.items() if spec.backward == "none"} == {"exact"}
