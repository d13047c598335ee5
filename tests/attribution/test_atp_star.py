"""AtP* (Kramár et al. 2024): the QK fix against a brute-force pattern patch, and GradDrop against
per-example EAP where the dropped passes leave one path."""

from __future__ import annotations

import gc

import pytest
import torch

from circuits import Graph, attribute
from circuits.data import PromptPairs
from circuits.errors import InputError
from circuits.models import HookedModel, load_model
from circuits.testing import tiny_tokenizer
from tests import brute_force
from tests.architectures import ARCHITECTURES
from tests.pairs import make_pairs


def _edges(model: HookedModel, graph: Graph, pairs: PromptPairs, method: str, **options) -> torch.Tensor:
    scores = attribute(model, graph, pairs, method=method, quiet=True, **options).edge_scores  # type: ignore[arg-type]
    assert scores is not None
    return scores


def _qk_norm_model() -> HookedModel:
    arch = next(a for a in ARCHITECTURES if a.model_type == "qwen3")
    return load_model(arch.build(), tiny_tokenizer())


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3"])
def test_qk_fix_recomputes_the_softmax_exactly(name, request):
    """RoPE with grouped-query attention (llama), LayerNorm with biases (gpt2), per-head q/k norms (qwen3)."""
    model = _qk_norm_model() if name == "qwen3" else request.getfixturevalue(name)
    graph, pairs = Graph.from_model(model), make_pairs(model)
    ours = _edges(model, graph, pairs, "atp*")
    eap = _edges(model, graph, pairs, "eap")
    reference = brute_force.qk_fix_scores(model, graph, pairs)
    scale = max(abs(v) for v in reference.values())
    worst = max(abs(float(ours[graph.edge_index(e)]) - v) for e, v in reference.items())
    assert worst < 1e-4 * scale
    moved = max(abs(float(ours[graph.edge_index(e)] - eap[graph.edge_index(e)])) for e in reference)
    assert moved > 1e-2 * scale  # the fix changes the q/k edges
    others = torch.ones_like(ours, dtype=torch.bool)
    for e in reference:
        others[graph.edge_index(e)] = False
    torch.testing.assert_close(ours[others], eap[others], rtol=0, atol=1e-7)  # and nothing else


def _per_example(model: HookedModel, graph: Graph, pairs: PromptPairs) -> list[torch.Tensor]:
    return [_edges(model, graph, pairs[i : i + 1], "eap") for i in range(len(pairs))]


def test_graddrop_leaves_one_path_where_the_model_has_two_layers(llama):
    """Two layers: for a last-layer source the pass dropping layer 0 keeps its whole effect and the one
    dropping its own layer none of it, so GradDrop is the mean |AtP|; for layer 0's MLP the pass dropping
    layer 1 keeps only its direct edge to the logits (dropping layer 0 removes everything), so GradDrop
    is the mean |that edge|."""
    graph, pairs = Graph.from_model(llama), make_pairs(llama)
    scores = attribute(llama, graph, pairs, method="atp*", level="node", quiet=True).node_scores
    assert scores is not None
    per_example = torch.stack(_per_example(llama, graph, pairs))  # [b, n_src, n_dst]
    last = [*range(graph.head_sources(1).start, graph.head_sources(1).stop), graph.mlp_source(1)]
    first = [graph.mlp_source(0)]
    want_last = per_example.sum(2)[:, last].abs().mean(0)
    want_first = per_example[:, first, graph.logits_destination].abs().mean(0)
    torch.testing.assert_close(scores[last], want_last, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores[first], want_first, rtol=1e-4, atol=1e-7)


def test_graddrop_needs_two_layers():
    from circuits.testing import tiny_llama

    model = tiny_llama(n_layers=1)
    with pytest.raises(InputError, match="2 layers"):
        attribute(model, Graph.from_model(model), make_pairs(model), method="atp*", level="node", quiet=True)


def _graph_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)


@pytest.mark.parametrize("level", ["edge", "node"])
def test_atp_star_keeps_no_autograd_graph(llama, level):
    """The scores are plain tensors, and no tensor of the forward graph outlives the call (the kept
    attention tensors and their hooks form a cycle through autograd that only `release` breaks)."""
    graph, pairs = Graph.from_model(llama), make_pairs(llama)
    attribute(llama, graph, pairs, method="atp*", level=level, quiet=True)  # probes run once, then cached
    before = _graph_tensors()
    result = attribute(llama, graph, pairs, method="atp*", level=level, quiet=True)
    scores = result.edge_scores if level == "edge" else result.node_scores
    assert scores is not None and not scores.requires_grad
    assert _graph_tensors() == before
