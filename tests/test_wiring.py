"""The wiring table (circuits/models/wiring.py): every graph index belongs to exactly one site, in order,
each site's hooks are hook points the model runs, and the graph's names and lookups agree with it."""

import itertools

import pytest
import torch

from circuits import Graph
from circuits.models.hooked import ModelSpec
from circuits.models.wiring import blocks, wiring


def _partition(slices: list[slice], n: int) -> None:
    assert slices[0].start == 0 and slices[-1].stop == n
    assert all(a.stop == b.start and a.start < a.stop for a, b in itertools.pairwise(slices))


def test_every_index_has_one_site_and_every_hook_is_run(layout):
    graph = Graph.from_model(layout)
    sites = wiring(layout, graph.spec)
    _partition([s.sources for s in sites.sources], graph.n_sources)
    _partition([d.destinations for d in sites.destinations], graph.n_destinations)
    assert sites is wiring(layout)  # built once per model and shape
    hooks = {s.hook for s in sites.sources} | {s.output_hook for s in sites.sources}
    hooks |= {d.hook for d in sites.destinations}
    hooks |= {d.residual_hook for d in sites.destinations if d.residual_hook is not None}
    assert all(layout.has_hook(name) for name in hooks), sorted(n for n in hooks if not layout.has_hook(n))
    with layout.capture(sorted(hooks)) as seen:  # each is reached in a forward pass
        layout(torch.tensor(layout.to_ids(["When Mary and John went to the store"])))
    assert set(seen) == hooks


def test_sites_name_the_graphs_nodes(layout):
    graph = Graph.from_model(layout)
    n_layers = layout.spec.n_layers
    for site in wiring(layout).sources:
        names = graph.sources[site.sources]
        match site.kind:
            case "input":
                assert names == ["input"] and site.layer == -1
            case "heads":
                assert names == [f"a{site.layer}.h{h}" for h in range(layout.spec.n_heads)]
                assert graph.head_sources(site.layer) == site.sources
            case "attention":
                assert names == [f"a{site.layer}"] and not layout.spec.per_head_sources
            case "mixer" if site.layer in layout.spec.parallel_mixer_layers:  # beside the heads
                assert (
                    names == [f"mix{site.layer}"]
                    and site.sources.start == graph.head_sources(site.layer).stop
                )
            case "mixer":
                assert names == [f"mix{site.layer}"] and site.layer in layout.spec.mixer_layers
                assert graph.head_sources(site.layer) == site.sources
            case "mlp":
                assert names == [f"m{site.layer}"] and graph.mlp_source(site.layer) == site.sources.start
    for dst in wiring(layout).destinations:
        into = graph.destinations[dst.destinations]
        if dst.letter:
            assert graph.qkv_destinations(dst.layer, dst.letter) == dst.destinations
            head = "kv" if len(into) < layout.spec.n_heads else "h"  # a key/value head's, grouped
            assert into == [f"a{dst.layer}.{head}{h}<{dst.letter}>" for h in range(len(into))]
            assert len(into) == layout.spec.n_qkv_heads(dst.letter)
        elif dst.kind == "mixer" and dst.layer in layout.spec.parallel_mixer_layers:
            assert (
                into == [f"mix{dst.layer}"] and graph.parallel_mixer(dst.layer)[0] == dst.destinations.start
            )
        elif dst.kind == "mixer":
            assert into == [f"mix{dst.layer}"] and graph.mixer_inputs(dst.layer) == dst.destinations
        elif dst.kind == "mlp":
            assert into == [f"m{dst.layer}"] and graph.mlp_destination(dst.layer) == dst.destinations.start
            assert (dst.residual_hook is not None) == layout.mlp_shares_attn_norm
        else:
            assert into == ["logits"] and dst.layer == n_layers


@pytest.mark.parametrize("per_head, parallel", [(True, False), (False, False), (True, True)])
def test_an_edge_runs_forward_only(per_head, parallel):
    """From the blocks' order alone: a head reaches every later layer's inputs and the logits, never its own
    layer's; an MLP reaches the next layer; in a parallel block the MLP reads what the attention reads."""
    spec = ModelSpec(3, 4, 2, 16, 4, 32, parallel_attn_mlp=parallel, per_head_sources=per_head)
    sources, destinations = blocks(spec)
    assert [b.kind for b in sources[:3]] == ["input", "heads" if per_head else "attention", "mlp"]
    assert [len(b) for b in destinations[:4]] == [4, 2, 2, 1]  # q per query head, k / v per kv head
    graph = Graph(spec)
    attn_0 = graph.head_sources(0).start
    assert not graph.valid[attn_0, graph.qkv_destinations(0, "q")].any()
    assert graph.valid[attn_0, graph.qkv_destinations(1, "k")].all()
    assert bool(graph.valid[attn_0, graph.mlp_destination(0)]) is not parallel
    assert graph.valid[graph.mlp_source(0), graph.qkv_destinations(1, "v")].all()
    assert not graph.valid[graph.mlp_source(2), graph.mlp_destination(2)]
    assert graph.valid[:, graph.logits_destination].all()
