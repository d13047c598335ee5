import json

import networkx as nx
import pytest
import torch

from circuits import Graph
from circuits.errors import FileFormatError, GraphMismatchError
from circuits.models import ModelSpec

GPT2_SMALL = ModelSpec(
    n_layers=12, n_heads=12, n_kv_heads=12, d_model=768, d_head=64, d_mlp=3072, name="gpt2"
)
SMOLLM2 = ModelSpec(n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_head=64, d_mlp=1536, name="smollm2")


def brute_force_edge_count(n_layers, n_heads, n_kv):
    """Count edges by walking the residual stream, independently of Graph's tensors."""
    upstream, edges = 1, 0  # 'input'
    for _ in range(n_layers):
        edges += upstream * (n_heads + 2 * n_kv)  # q per head, k and v per kv head
        upstream += n_heads
        edges += upstream  # MLP input sees this layer's heads too
        upstream += 1
    return edges + upstream  # logits


def test_gpt2_small_has_eap_ig_edge_count():
    graph = Graph.from_model(GPT2_SMALL)
    assert graph.n_edges == 32491 == brute_force_edge_count(12, 12, 12)
    assert graph.n_sources == 1 + 12 * 13
    assert graph.n_destinations == 12 * (3 * 12 + 1) + 1


def test_smollm2_counts():
    graph = Graph.from_model(SMOLLM2)
    assert graph.n_edges == 70651 == brute_force_edge_count(30, 9, 3)
    assert graph.n_sources == 301 and graph.n_destinations == 481
    counts = graph.count_by_kind()
    assert (
        counts["edges into k inputs"] == counts["edges into v inputs"] == counts["edges into q inputs"] // 3
    )


def test_edge_names_follow_eap_ig():
    graph = Graph.from_model(GPT2_SMALL)
    names = set(graph.edge_names())
    assert {"input->a0.h3<q>", "a0.h1->m3", "m11->logits", "a0.h1->m0"} <= names
    assert "m3->a2.h0<q>" not in names and "m0->m0" not in names
    with pytest.raises(GraphMismatchError, match="backwards"):
        graph.edge_index("m3->a2.h0<q>")
    with pytest.raises(GraphMismatchError, match="not an edge"):
        graph.edge_index("a99.h0->logits")


def test_gqa_destinations_per_kv_head():
    graph = Graph.from_model(SMOLLM2)
    assert "a0.kv2<k>" in graph.dst_index and "a0.kv3<k>" not in graph.dst_index
    assert "a0.h2<k>" not in graph.dst_index  # EAP-IG's name of query head 2's own k input
    assert "a0.h8<q>" in graph.dst_index


def test_json_round_trip(tmp_path):
    graph = Graph.from_model(SMOLLM2)
    graph.scores[graph.valid] = torch.randn(graph.n_edges)
    graph.in_graph = graph.valid & (graph.scores > 0.5)
    graph.node_scores = torch.randn(graph.n_sources)
    graph.to_json(tmp_path / "c.json")
    back = Graph.from_json(tmp_path / "c.json")
    assert back.spec.n_kv_heads == 3
    assert torch.equal(back.in_graph, graph.in_graph)
    assert torch.allclose(back.scores, graph.scores)
    assert torch.allclose(back.node_scores, graph.node_scores)
    graph.to_pt(tmp_path / "c.pt")
    assert torch.equal(Graph.from_pt(tmp_path / "c.pt").in_graph, graph.in_graph)


def test_reads_eap_ig_format(tmp_path):
    """A file shaped like EAP-IG's Graph.to_json output (cfg subset, nodes incl. logits, all edges)."""
    n_layers, n_heads = 2, 2
    nodes = {"input": {"in_graph": True}, "logits": {"in_graph": True}}
    edges = {}
    upstream = ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        for h in heads:
            nodes[h] = {"in_graph": h != "a1.h1"}
            for letter in "qkv":
                for u in upstream:
                    edges[f"{u}->{h}<{letter}>"] = {"score": 0.25, "in_graph": u == "input"}
        upstream += heads
        nodes[f"m{layer}"] = {"in_graph": True}
        for u in upstream:
            edges[f"{u}->m{layer}"] = {"score": -1.0, "in_graph": False}
        upstream.append(f"m{layer}")
    for u in upstream:
        edges[f"{u}->logits"] = {"score": 2.0, "in_graph": True}
    cfg = {"n_layers": n_layers, "n_heads": n_heads, "parallel_attn_mlp": False, "d_model": 8}
    (tmp_path / "eap.json").write_text(json.dumps({"cfg": cfg, "nodes": nodes, "edges": edges}))

    graph = Graph.from_json(tmp_path / "eap.json")
    assert graph.n_edges == len(edges)
    assert int(graph.in_graph.sum()) == sum(e["in_graph"] for e in edges.values())
    assert not graph.nodes_in_graph[graph.src_index["a1.h1"]]
    r, c = graph.edge_index("m1->logits")
    assert graph.scores[r, c] == 2.0 and graph.in_graph[r, c]


def test_bad_circuit_files(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"nodes": {}}))
    with pytest.raises(FileFormatError, match="missing keys"):
        Graph.from_json(tmp_path / "x.json")


def test_networkx_and_summary():
    graph = Graph.from_model(ModelSpec(2, 2, 1, 8, 4, 16, name="toy"))
    g = graph.to_networkx()
    assert isinstance(g, nx.MultiDiGraph)
    kv = sum(int(graph.valid[:, graph.qkv_destinations(layer, x)].sum()) for layer in (0, 1) for x in "kv")
    assert g.number_of_edges() == graph.n_edges + kv  # the one key/value head's inputs feed both heads
    assert g.has_edge("input", "a0.h1") and g.has_edge("a1.h0", "logits")
    assert {v for _, v, k in g.edges(keys=True) if k == "input->a1.kv0<k>"} == {"a1.h0", "a1.h1"}
    text = graph.summary()
    assert "edges: total" in text and str(graph.n_edges) in text


def test_graph_fits_model(llama):
    graph = Graph.from_model(llama)
    graph.check_fits(llama.spec)
    with pytest.raises(GraphMismatchError, match="does not fit"):
        graph.check_fits(GPT2_SMALL)


POST_NORM = ModelSpec(3, 4, 2, 16, 4, 32, name="sandwich", per_head_sources=False)


def test_post_norm_graph_has_one_attention_source_per_layer(tmp_path):
    """Heads stay destinations (q per head, k/v per kv head); the layer's normed attention output `a{l}` is
    the source, reading all of them. Edge count walked by hand: each layer adds 1 + 1 sources."""
    graph = Graph.from_model(POST_NORM)
    assert graph.sources == ["input", "a0", "m0", "a1", "m1", "a2", "m2"]
    upstream, edges = 1, 0
    for _ in range(3):
        edges += upstream * (4 + 2 * 2) + (upstream + 1)  # q/k/v inputs, then the MLP input sees a{l}
        upstream += 2
    assert graph.n_edges == edges + upstream
    g = graph.to_networkx()
    assert g.has_edge("a0", "a1") and g.has_edge("m1", "a2") and not any("." in n for n in g.nodes)
    keys = {k for _, _, k in g.edges(keys=True)}
    assert "a0->a1.h3<q>" in keys and "a1->a2.kv1<v>" in keys
    graph.scores[graph.valid] = torch.randn(graph.n_edges)
    circuit = graph.top_n(5)
    circuit.to_json(tmp_path / "c.json")
    back = Graph.from_json(tmp_path / "c.json")
    assert not back.spec.per_head_sources and torch.equal(back.in_graph, circuit.in_graph)
    with pytest.raises(GraphMismatchError, match="per_head_sources"):
        back.check_fits(ModelSpec(3, 4, 2, 16, 4, 32))


def test_a_hybrid_graph_has_one_mixer_node_per_mixer_layer(tmp_path):
    """Layers 0 and 2 are mixers (one node `mix{l}`, one input each), layer 1 attention with 4 heads and 2
    key-value heads. Edge count walked by hand; files keep which layers are mixers."""
    spec = ModelSpec(3, 4, 2, 16, 4, 32, name="hybrid", mixer_layers=(2, 0))
    assert spec.mixer_layers == (0, 2) and spec.attention_layers == [1]
    graph = Graph.from_model(spec)
    assert graph.sources == ["input", "mix0", "m0", *[f"a1.h{h}" for h in range(4)], "m1", "mix2", "m2"]
    assert graph.destinations[:2] == ["mix0", "m0"] and graph.node_kind("mix2") == "mixer"
    upstream, edges = 1, 0
    for layer in range(3):
        reads, writes = (1, 1) if layer != 1 else (4 + 2 * 2, 4)  # a mixer's input, or q/k/v inputs
        edges += upstream * reads + (upstream + writes)  # then the MLP input sees the layer's writes
        upstream += writes + 1
    assert graph.n_edges == edges + upstream
    assert (
        graph.count_by_kind()["nodes: mixers"] == 2 and graph.count_by_kind()["nodes: attention heads"] == 4
    )
    graph.scores[graph.valid] = torch.randn(graph.n_edges)
    circuit = graph.top_n(6)
    for write, read in (("to_json", "from_json"), ("to_pt", "from_pt")):
        getattr(circuit, write)(tmp_path / f"c.{write}")
        back = getattr(Graph, read)(tmp_path / f"c.{write}")
        assert back.spec.mixer_layers == (0, 2) and torch.equal(back.in_graph, circuit.in_graph)
    with pytest.raises(GraphMismatchError, match="mixer_layers"):
        back.check_fits(ModelSpec(3, 4, 2, 16, 4, 32))


def test_a_state_space_graph_has_one_mixer_per_block_and_no_mlps(tmp_path):
    spec = ModelSpec(2, 1, 1, 16, 16, 32, name="mamba", mixer_layers=(0, 1), layers_without_mlp=(0, 1))
    graph = Graph.from_model(spec)
    assert graph.sources == ["input", "mix0", "mix1"] and graph.destinations == ["mix0", "mix1", "logits"]
    assert graph.n_edges == 1 + 2 + 3  # mix0 reads the input; mix1 the input and mix0; logits all three
    assert "nodes: attention heads" in graph.count_by_kind() and graph.count_by_kind()["nodes: MLPs"] == 0
    graph.scores[graph.valid] = torch.randn(graph.n_edges)
    graph.top_n(2).to_json(tmp_path / "c.json")
    assert Graph.from_json(tmp_path / "c.json").spec.layers_without_mlp == (0, 1)
