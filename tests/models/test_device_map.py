"""Models placed by a device map (accelerate's dispatch, as `from_pretrained(device_map=...)` does): they
load through the same checks and score exactly as a model on one device. Without GPUs every placement is
the CPU, so this exercises the loading path and accelerate's hooks, not transfers between devices."""

import pytest
import torch

from circuits import Graph, attribute, load_model
from circuits.errors import InputError
from circuits.evaluation import evaluate
from circuits.testing import tiny_llama_hf, tiny_tokenizer
from tests.pairs import make_pairs

PER_LAYER = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


def _scores(model, method):
    graph = Graph.from_model(model)
    return graph, attribute(model, graph, make_pairs(model), method=method, quiet=True).edge_scores


@pytest.mark.parametrize("device_map", [PER_LAYER, "auto"])
def test_a_dispatched_model_scores_as_one_on_a_single_device(device_map):
    plain = load_model(tiny_llama_hf(), tiny_tokenizer())
    placed = load_model(tiny_llama_hf(), tiny_tokenizer(), device_map=device_map)
    assert placed.bridge.original_model.hf_device_map  # the dispatch happened
    for method in ("eap", "eap-ig-inputs"):
        _, want = _scores(plain, method)
        graph, ours = _scores(placed, method)
        assert torch.equal(ours, want)
    circuit = graph.top_n(20)
    pairs = make_pairs(placed)
    assert evaluate(placed, circuit, pairs).faithfulness == evaluate(plain, circuit, pairs).faithfulness


def test_a_saved_model_loads_with_a_device_map(tmp_path):
    tiny_llama_hf().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    placed = load_model(str(tmp_path), device_map="auto")
    plain = load_model(str(tmp_path))
    assert torch.equal(_scores(placed, "eap")[1], _scores(plain, "eap")[1])


def test_bad_device_maps_are_refused():
    with pytest.raises(InputError, match="device_map"):
        load_model(tiny_llama_hf(), tiny_tokenizer(), device_map="everywhere")
    with pytest.raises(InputError, match="device_map"):
        load_model(tiny_llama_hf(), tiny_tokenizer(), device_map={})
