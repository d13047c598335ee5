"""Selection and pruning against independent reachability (networkx) and hand-made circuits."""

import networkx as nx
import pytest
import torch

from circuits import Graph
from circuits.errors import InputError
from circuits.models.hooked import ModelSpec
from circuits.selection import destination_owners

SPEC = ModelSpec(n_layers=2, n_heads=4, n_kv_heads=2, d_model=8, d_head=2, d_mlp=16, name="tiny-gqa")


def circuit_of(names: list[str]) -> Graph:
    graph = Graph(SPEC)
    graph.in_graph.zero_()
    for name in names:
        graph.in_graph[graph.edge_index(name)] = True
    return graph


def kept(graph: Graph) -> set[str]:
    return set(graph.edge_names(graph.in_graph))


def test_prune_hand_made_circuit():
    # a1.kv1<k> is the key input of kv group 1: heads a1.h2 and a1.h3
    live = ["input->a0.h0<q>", "a0.h0->a1.kv1<k>", "a1.h3->logits", "input->m0", "m0->logits"]
    dead = [
        "a0.h1->m1",  # a0.h1 has no input edge, and m1 leads nowhere
        "input->a0.kv1<v>",  # a0.h2 and a0.h3 (kv group 1) feed nothing
        "a1.h0->logits",  # reaches the logits, but nothing reaches a1.h0
    ]
    pruned = circuit_of(live + dead).pruned()
    assert kept(pruned) == set(live)
    names = [pruned.sources[i] for i in pruned.nodes_in_graph.nonzero()[:, 0].tolist()]
    assert names == ["input", "a0.h0", "m0", "a1.h3"]


def reachable_edges(graph: Graph) -> set[str]:
    """Independent: edges on an input -> logits path, from networkx over node names."""
    g = nx.DiGraph()
    owners = destination_owners(graph)
    rows, cols = (graph.in_graph & graph.valid).nonzero(as_tuple=True)
    for r, c in zip(rows.tolist(), cols.tolist()):
        targets = (
            ["logits"]
            if c == graph.logits_destination
            else [graph.sources[o] for o in owners[c].nonzero()[:, 0].tolist()]
        )
        for t in targets:
            g.add_edge(graph.sources[r], t, dst=c)
    if "input" not in g or "logits" not in g:
        return set()
    forward = nx.descendants(g, "input") | {"input"}
    backward = nx.ancestors(g, "logits") | {"logits"}
    out = set()
    for u, t, data in g.edges(data=True):
        if u in forward and t in backward:
            out.add(f"{u}->{graph.destinations[data['dst']]}")
    return out


@pytest.mark.parametrize("seed", range(5))
def test_prune_matches_networkx_reachability(seed):
    gen = torch.Generator().manual_seed(seed)
    graph = Graph(SPEC)
    graph.in_graph = (torch.rand(graph.valid.shape, generator=gen) < 0.15) & graph.valid
    assert kept(graph.pruned()) == reachable_edges(graph)


def scored_graph(seed: int = 0) -> Graph:
    graph = Graph(SPEC)
    gen = torch.Generator().manual_seed(seed)
    graph.scores = torch.randn(graph.valid.shape, generator=gen) * graph.valid
    return graph


def test_top_n_absolute_and_signed():
    graph = scored_graph()
    valid_scores = graph.scores[graph.valid]
    top = graph.top_n(5, absolute=True, prune=False)
    assert top.n_in_graph == 5
    assert graph.scores[top.in_graph].abs().min() >= valid_scores.abs().sort(descending=True).values[4]
    helpful = graph.top_n(5, absolute=False, prune=False)
    assert graph.scores[helpful.in_graph].max() <= valid_scores.sort().values[4]  # most negative five
    assert graph.n_in_graph == graph.n_edges  # the caller's graph is untouched


def test_threshold():
    graph = scored_graph()
    circuit = graph.threshold(1.0, prune=False)
    assert torch.equal(circuit.in_graph, (graph.scores.abs() >= 1.0) & graph.valid)


def brute_force_greedy(graph: Graph, n: int) -> set[tuple[int, int]]:
    owners = destination_owners(graph)
    open_dsts, chosen = {graph.logits_destination}, set()
    for _ in range(n):
        candidates = [
            (float(graph.scores[r, c].abs()), r, c)
            for c in open_dsts
            for r in graph.valid[:, c].nonzero()[:, 0].tolist()
            if (r, c) not in chosen
        ]
        if not candidates:
            break
        _, r, c = max(candidates)
        chosen.add((r, c))
        open_dsts |= set(owners[:, r].nonzero()[:, 0].tolist())
    return chosen


@pytest.mark.parametrize("n", [1, 7, 30])
def test_greedy_matches_brute_force(n):
    graph = scored_graph(1)
    circuit = graph.greedy(n, prune=False)
    rows, cols = circuit.in_graph.nonzero(as_tuple=True)
    assert set(zip(rows.tolist(), cols.tolist())) == brute_force_greedy(graph, n)


def test_top_nodes_keeps_edges_between_chosen_nodes():
    graph = Graph(SPEC)
    graph.node_scores = torch.zeros(graph.n_sources)
    for name, score in [("a0.h1", -3.0), ("m1", 2.0), ("a1.h2", 0.1)]:
        graph.node_scores[graph.src_index[name]] = score
    circuit = graph.top_nodes(2, prune=False)
    assert kept(circuit) == {
        "input->a0.h1<q>",
        "input->a0.kv0<k>",
        "input->a0.kv0<v>",
        "input->m1",
        "a0.h1->m1",
        "input->logits",
        "a0.h1->logits",
        "m1->logits",
    }
    with pytest.raises(ValueError, match="node scores"):
        Graph(SPEC).top_nodes(1)


def test_bad_sizes():
    graph = scored_graph()
    with pytest.raises(InputError, match=r"n must be a whole number in \[0, 82\], got 83"):
        graph.top_n(graph.n_edges + 1)
    with pytest.raises(InputError, match=r"got 2\.5"):
        graph.top_n(2.5)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="n must be a whole number"):
        graph.greedy(-1)
