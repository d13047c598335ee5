"""Source outputs kept in shards (`circuits.sources.SourceOutputs`, as for a model placed over several
devices) give the results of one buffer: every method, evaluation and the mask gradient run with a shard
per layer, all on the CPU, so that every shard boundary is crossed (AtP*'s QK fix included, which the
stand-in device of tests/test_virtual_device.py cannot run)."""

from __future__ import annotations

import pytest
import torch

from circuits import Graph, attribute
from circuits.attribution import METHODS
from circuits.errors import UnsupportedModelError
from circuits.evaluation import evaluate_many
from circuits.evaluation.refinement import mask_gradient
from circuits.models.hooked import HookedModel
from circuits.sources import Placement, source_placement
from tests.architectures import ATP_STAR_REFUSALS
from tests.pairs import make_pairs

USERS = ("circuits.attribution.methods", "circuits.evaluation.patched", "circuits.intervention")


def _per_layer(model: HookedModel, graph: Graph) -> Placement:
    """The input, then each layer's sources, as separate shards on the model's device."""
    ends = [1] + [graph.mlp_source(layer) + 1 for layer in range(graph.spec.n_layers)]
    return [(slice(start, stop), model.device) for start, stop in zip([0, *ends[:-1]], ends, strict=True)]


def _one_and_sharded(monkeypatch: pytest.MonkeyPatch, run) -> tuple[torch.Tensor, torch.Tensor]:
    whole = run()
    for module in USERS:
        monkeypatch.setattr(f"{module}.source_placement", _per_layer)
    return whole, run()


def test_the_per_layer_placement_splits_at_every_layer(llama):
    graph = Graph.from_model(llama)
    assert len(source_placement(llama, graph)) == 1  # one device: one shard
    assert len(_per_layer(llama, graph)) == graph.spec.n_layers + 1


@pytest.mark.parametrize("level", ["edge", "node"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_scores_alike_from_shards(layout, method, level, monkeypatch, request):
    if method == "atp*" and request.node.callspec.params["layout"] in ATP_STAR_REFUSALS:
        with pytest.raises(UnsupportedModelError):  # refused for the layout, sharded or not
            attribute(layout, Graph.from_model(layout), make_pairs(layout), method=method, level=level)
        return
    graph, pairs = Graph.from_model(layout), make_pairs(layout)

    def run() -> torch.Tensor:
        found = attribute(layout, graph, pairs, method=method, level=level, quiet=True)
        scores = found.edge_scores if level == "edge" else found.node_scores
        assert scores is not None
        return scores

    whole, sharded = _one_and_sharded(monkeypatch, run)
    assert whole.abs().max() > 1e-3
    torch.testing.assert_close(sharded, whole, rtol=0, atol=1e-6 * float(whole.abs().max()))


def test_evaluation_and_the_mask_gradient_alike_from_shards(layout, monkeypatch):
    graph, pairs = Graph.from_model(layout), make_pairs(layout)
    attribute(layout, graph, pairs, method="eap", quiet=True)
    circuits = [graph.top_n(3), graph.top_n(graph.n_edges // 2)]

    def run() -> torch.Tensor:
        found = evaluate_many(layout, circuits, pairs, quiet=True)
        gradient = mask_gradient(layout, circuits[1], pairs).grad
        return torch.cat([*(e.per_example for e in found), gradient.flatten().float()])

    whole, sharded = _one_and_sharded(monkeypatch, run)
    torch.testing.assert_close(sharded, whole, rtol=1e-5, atol=1e-6 * float(whole.abs().max()))
