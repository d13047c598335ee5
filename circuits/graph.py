"""The computational graph of a transformer: sources, destinations, and dense edge tensors.

Sources (upstream nodes), in topological order: `input`, then per layer `a{l}.h{h}` for each head (or,
for post-norm blocks, one `a{l}`: the layer's normed attention output) and `m{l}`. Destinations (inputs
of downstream nodes), per layer: `a{l}.h{h}<q>`, `a{l}.h{h}<k>`, `a{l}.h{h}<v>` for each head, `m{l}`;
then `logits`. Edge `u->v` exists when u's output is part of v's input. Names follow EAP-IG, so circuit
files interoperate (GPT-2 small: 32,491 edges). A grouped-query model's graph has one k and one v input per
key/value head g, `a{l}.kv{g}<k>` and `a{l}.kv{g}<v>` (a spelling EAP-IG's loader refuses rather than
misreads as query head g's); `Graph.from_model(model, ungrouped=True)` gives every query head its own, as
EAP-IG and MIB do (run on the model's ungrouped twin, `circuits.models.ungroup`).

Everything per edge lives in `[n_sources, n_destinations]` tensors: `valid` (the edge exists), `scores`
(float32), `in_graph` (bool). Node-level results live in `[n_sources]` tensors.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import torch
from torch import Tensor

from circuits import selection
from circuits.errors import CircuitsWarning, FileFormatError, GraphMismatchError, InputError
from circuits.models.hooked import HookedModel, ModelSpec
from circuits.models.ungroup import ungrouped_spec
from circuits.models.wiring import Block, DestinationKind, SourceKind, blocks
from circuits.textfiles import read_text

_DST_RE = re.compile(r"^(a(\d+)\.(?:h|kv)(\d+))<([qkv])>$")
NodeKind = Literal["input", "head", "attention", "mixer", "mlp", "logits"]
_NAMES: dict[str, Callable[[int, int], str]] = {  # a block's node names, by kind: (layer, i) -> name
    "input": lambda _layer, _i: "input",
    "heads": lambda layer, h: f"a{layer}.h{h}",
    "attention": lambda layer, _i: f"a{layer}",
    "mixer": lambda layer, _i: f"mix{layer}",
    "mlp": lambda layer, _i: f"m{layer}",
    "q": lambda layer, h: f"a{layer}.h{h}<q>",
    "k": lambda layer, h: f"a{layer}.h{h}<k>",
    "v": lambda layer, h: f"a{layer}.h{h}<v>",
    "logits": lambda _layer, _i: "logits",
}


class Graph:
    """Nodes and edges of one model architecture, with edge scores and a circuit mask."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.source_blocks, self.destination_blocks = blocks(spec)
        self.sources = [_NAMES[b.kind](b.layer, i) for b in self.source_blocks for i in range(len(b))]
        grouped = spec.n_kv_heads < spec.n_heads
        self.destinations = [
            f"a{b.layer}.kv{i}<{b.kind}>" if grouped and b.kind in ("k", "v") else _NAMES[b.kind](b.layer, i)
            for b in self.destination_blocks
            for i in range(len(b))
        ]
        self._source_block = {(b.kind, b.layer): b for b in self.source_blocks}
        self._destination_block = {(b.kind, b.layer): b for b in self.destination_blocks}

        self._where: dict[str, tuple[NodeKind, int | None, int | None]] = {"input": ("input", None, None)}
        for layer in range(spec.n_layers):
            if not spec.has_attention(layer):
                self._where[f"mix{layer}"] = ("mixer", layer, None)
            elif spec.per_head_sources:
                for h in range(spec.n_heads):
                    self._where[f"a{layer}.h{h}"] = ("head", layer, h)
            else:
                self._where[f"a{layer}"] = ("attention", layer, None)
            if layer in spec.parallel_mixer_layers:
                self._where[f"mix{layer}"] = ("mixer", layer, None)
            if spec.has_mlp(layer):
                self._where[f"m{layer}"] = ("mlp", layer, None)
        self._where["logits"] = ("logits", None, None)
        self.src_index = {name: i for i, name in enumerate(self.sources)}
        self.dst_index = {name: i for i, name in enumerate(self.destinations)}
        src_order = torch.tensor([b.order for b in self.source_blocks for _ in range(len(b))])
        dst_order = torch.tensor([b.order for b in self.destination_blocks for _ in range(len(b))])
        self.valid: Tensor = src_order[:, None] < dst_order[None, :]
        self.scores: Tensor = torch.zeros(self.valid.shape, dtype=torch.float32)
        self.in_graph: Tensor = self.valid.clone()
        self.node_scores: Tensor | None = None
        self.nodes_in_graph: Tensor = torch.ones(len(self.sources), dtype=torch.bool)
        # the metric the scores were computed with (`metrics.metric_name`), set by `attribute`, kept in files
        self.metric: str | None = None
        self.node_magnitudes = False  # node scores are magnitudes (AtP*'s GradDrop): no signed selection

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model: HookedModel | ModelSpec, ungrouped: bool = False) -> Graph:
        """The full graph of a hooked model (or of a `ModelSpec`, e.g. built from a config).

        ungrouped: for a grouped-query model, every query head with its own k and v inputs (EAP-IG's
            `ungroup_grouped_query_attention`, MIB's edge set); the functions taking graphs run it on the
            model's ungrouped twin (`circuits.models.ungroup`), which computes the same function.
        """
        spec = model.spec if isinstance(model, HookedModel) else model
        return cls(ungrouped_spec(spec) if ungrouped else spec)

    def copy(self) -> Graph:
        """An independent copy (tensors cloned)."""
        new = Graph(self.spec)
        new.scores = self.scores.clone()
        new.in_graph = self.in_graph.clone()
        new.nodes_in_graph = self.nodes_in_graph.clone()
        new.node_scores = None if self.node_scores is None else self.node_scores.clone()
        new.metric = self.metric
        new.node_magnitudes = self.node_magnitudes
        return new

    def with_scores(self, edge_scores: Tensor | None, node_scores: Tensor | None = None) -> Graph:
        """A copy scored with `edge_scores` [n_sources, n_destinations] and `node_scores` [n_sources] (e.g.
        an `Attribution`'s); a score that is None stays as it was."""
        new = self.copy()
        if edge_scores is not None:
            if edge_scores.shape != self.valid.shape:
                raise InputError(
                    f"edge scores must be {tuple(self.valid.shape)}, got {tuple(edge_scores.shape)}"
                )
            new.scores = edge_scores.detach().float().cpu().clone()
        if node_scores is not None:
            new.node_scores = node_scores.detach().float().cpu().clone()
            new.node_magnitudes = False
        return new

    # ------------------------------------------------------------ grouped and ungrouped (copies)
    def key_value_copies(self, n_kv_heads: int) -> Tensor:
        """long [n_destinations]: for each destination of this ungrouped graph, the destination of the
        graph of `n_kv_heads` key/value heads it is a copy of (query head h's k / v input: key/value head
        h // (n_heads / n_kv_heads)'s; every other destination: itself)."""
        spec = self.spec
        if spec.n_kv_heads != spec.n_heads or n_kv_heads < 1 or spec.n_heads % n_kv_heads:
            raise InputError(
                f"key_value_copies maps an ungrouped graph ({spec.n_kv_heads} key/value heads of "
                f"{spec.n_heads} here) onto {n_kv_heads} key/value heads, a divisor of {spec.n_heads}"
            )
        grouped = Graph(replace(spec, n_kv_heads=n_kv_heads))
        group = spec.n_heads // n_kv_heads
        index = torch.empty(self.n_destinations, dtype=torch.long)
        for j, name in enumerate(self.destinations):
            match = _DST_RE.match(name)
            if match and match.group(4) in ("k", "v") and group > 1:
                name = f"a{match.group(2)}.kv{int(match.group(3)) // group}<{match.group(4)}>"
            index[j] = grouped.dst_index[name]
        return index

    def grouped(self, n_kv_heads: int) -> Graph:
        """This ungrouped graph (EAP-IG's / MIB's, or `from_model(..., ungrouped=True)`) on the graph of
        a model with `n_kv_heads` key/value heads: an edge into a key/value head's input scores the sum of
        its copies' scores (what every gradient method gives it, exactly) and is in the circuit when any
        of its copies is (nodes and their scores are the same in both graphs)."""
        copies = self.key_value_copies(n_kv_heads)
        out = Graph(replace(self.spec, n_kv_heads=n_kv_heads))
        out.scores.zero_().index_add_(1, copies, self.scores * self.valid)
        kept = torch.zeros(out.valid.shape, dtype=torch.long).index_add_(
            1, copies, (self.in_graph & self.valid).long()
        )
        out.in_graph = kept > 0
        out.nodes_in_graph = self.nodes_in_graph.clone()
        out.node_scores = None if self.node_scores is None else self.node_scores.clone()
        out.metric = self.metric
        return out

    def ungrouped(self) -> Graph:
        """This graph with every query head's own k and v inputs: the circuit as it is (a copy of a
        key/value head's edge is in the circuit when that edge is), and each copy the key/value head's
        score divided by the number of copies, an apportionment, not a computed score (a
        `CircuitsWarning` says so when there are scores); `attribute` on `from_model(model,
        ungrouped=True)` computes them."""
        out = Graph(ungrouped_spec(self.spec))
        if self.spec.n_kv_heads == self.spec.n_heads:
            return self.copy()
        copies = out.key_value_copies(self.spec.n_kv_heads)
        shares = torch.bincount(copies, minlength=self.n_destinations).float()
        out.scores = (self.scores / shares)[:, copies] * out.valid
        out.in_graph = self.in_graph[:, copies] & out.valid
        out.nodes_in_graph = self.nodes_in_graph.clone()
        out.node_scores = None if self.node_scores is None else self.node_scores.clone()
        out.metric = self.metric
        if bool(self.scores.any()):
            warnings.warn(
                "ungrouped(): each query head's copy of a key/value edge gets an equal share of the grouped "
                "score (the circuit is exact, the split of scores is not); attribute on "
                "Graph.from_model(model, ungrouped=True) to compute the copies' own scores",
                CircuitsWarning,
                stacklevel=2,
            )
        return out

    # -------------------------------------------------------------------- selection (copies)
    def top_n(self, n: int, absolute: bool = True, prune: bool = True) -> Graph:
        """A copy whose circuit is the `n` best-ranked edges, then pruned (see `circuits.selection`)."""
        return _not_emptied(selection.top_n(self, n, absolute, prune), n)

    def threshold(self, t: float, absolute: bool = True, prune: bool = True) -> Graph:
        """A copy whose circuit is the edges ranked at least `t`, then pruned."""
        chosen = (selection.ranking(self, self.scores, absolute) >= t) & self.valid  # one ranking, no copy
        return _not_emptied(selection.with_edges(self, chosen, prune), int(chosen.sum()) if prune else 0)

    def greedy(self, n: int, absolute: bool = True, prune: bool = True) -> Graph:
        """A copy whose circuit grows edge by edge from the logits, `n` edges."""
        return _not_emptied(selection.greedy(self, n, absolute, prune), n)

    def top_nodes(self, k: int, absolute: bool = True, prune: bool = True) -> Graph:
        """A copy whose circuit is every edge between the `k` best-ranked nodes (by `node_scores`)."""
        return _not_emptied(selection.top_nodes(self, k, absolute, prune), k)

    def pruned(self) -> Graph:
        """A copy without the circuit's dead edges (not on an input -> logits path)."""
        circuit = self.copy()
        selection.prune_dead(circuit)
        return circuit

    @property
    def n_in_graph(self) -> int:
        """Number of edges in the circuit."""
        return int((self.in_graph & self.valid).sum())

    # ---------------------------------------------------------------------------------- indexing
    @property
    def n_sources(self) -> int:
        return len(self.sources)

    @property
    def n_destinations(self) -> int:
        return len(self.destinations)

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def node_kind(self, node: str) -> NodeKind:
        """`input`, `head` (`a3.h1`), `attention` (a post-norm layer's `a3`), `mixer` (a layer without
        attention: `mix3`), `mlp` or `logits`."""
        return self._node(node)[0]

    def node_layer(self, node: str) -> int | None:
        """The layer of a head, attention or MLP node (None for input and logits)."""
        return self._node(node)[1]

    def node_head(self, node: str) -> int | None:
        """The head index of a head node (None for every other kind)."""
        return self._node(node)[2]

    def _node(self, node: str) -> tuple[NodeKind, int | None, int | None]:
        try:
            return self._where[node]
        except KeyError:
            raise GraphMismatchError(f"'{node}' is not a node of this graph ({self.spec.name})") from None

    def valid_prefixes(self) -> list[int]:
        """[n_destinations] number n_v of sources reaching each destination; they are sources [0, n_v)."""
        counts = self.valid.sum(0)
        prefix = torch.arange(self.n_sources)[:, None] < counts[None, :]
        if not torch.equal(prefix, self.valid):
            raise AssertionError("the sources reaching a destination are not a prefix of the source list")
        return counts.tolist()

    def source_block(self, kind: SourceKind, layer: int = -1) -> Block:
        """The sources a component owns: `source_block("heads", 3)`, `source_block("input")`."""
        return self._lookup(self._source_block, "source", kind, layer)

    def destination_block(self, kind: DestinationKind, layer: int | None = None) -> Block:
        """The destinations a component owns: `destination_block("q", 3)`, `destination_block("logits")`."""
        layer = self.spec.n_layers if layer is None else layer
        return self._lookup(self._destination_block, "destination", kind, layer)

    def _lookup(self, found: dict[tuple[Any, int], Block], side: str, kind: str, layer: int) -> Block:
        try:
            return found[(kind, layer)]
        except KeyError:
            raise GraphMismatchError(
                f"this graph ({self.spec.name}) has no {kind} {side}s at {layer}"
            ) from None

    def head_sources(self, layer: int) -> slice:
        """Source indices of layer `layer`'s token mixer: its heads, its one `a{l}` source (post-norm), or
        its one `mix{l}` (a layer without attention)."""
        if not self.spec.has_attention(layer):
            return self.source_block("mixer", layer).indices
        return self.source_block("heads" if self.spec.per_head_sources else "attention", layer).indices

    def mixer_inputs(self, layer: int) -> slice:
        """Destination indices of what layer `layer`'s token mixer reads: its heads' q, k and v inputs, or
        a mixer layer's one input (a mixer beside the heads: `parallel_mixer`)."""
        if not self.spec.has_attention(layer):
            return self.destination_block("mixer", layer).indices
        return slice(self.qkv_destinations(layer, "q").start, self.qkv_destinations(layer, "v").stop)

    def parallel_mixer(self, layer: int) -> tuple[int, int]:
        """(destination index, source index) of the mixer `mix{l}` beside layer `layer`'s heads."""
        return self.destination_block("mixer", layer).indices.start, self.source_block(
            "mixer", layer
        ).indices.start

    def mlp_source(self, layer: int) -> int:
        return self.source_block("mlp", layer).indices.start

    def qkv_destinations(self, layer: int, letter: str) -> slice:
        """Destination indices of layer `layer`'s q, k or v inputs (one per query / key-value head)."""
        return self.destination_block(letter, layer).indices  # type: ignore[arg-type]

    def mlp_destination(self, layer: int) -> int:
        return self.destination_block("mlp", layer).indices.start

    @property
    def logits_destination(self) -> int:
        return self.destination_block("logits").indices.start

    def edge_names(self, mask: Tensor | None = None) -> list[str]:
        """Names `src->dst` of the valid edges (restricted to `mask` if given), row-major order."""
        mask = self.valid if mask is None else (mask & self.valid)
        rows, cols = mask.nonzero(as_tuple=True)
        return [f"{self.sources[r]}->{self.destinations[c]}" for r, c in zip(rows.tolist(), cols.tolist())]

    def edge_index(self, name: str) -> tuple[int, int]:
        """(source, destination) indices of an edge name such as `a0.h1->a2.h3<q>`."""
        try:
            src, dst = name.split("->")
            index = self.src_index[src], self.dst_index[dst]
        except (ValueError, KeyError):
            raise GraphMismatchError(f"'{name}' is not an edge of this graph ({self.spec.name})") from None
        if not self.valid[index]:
            raise GraphMismatchError(f"'{name}' runs backwards: {src} is not upstream of {dst}")
        return index

    @staticmethod
    def qkv_letter(dst: str) -> str | None:
        """`q`, `k` or `v` for a head input destination (`a3.h1<k>` -> `k`), else None."""
        match = _DST_RE.match(dst)
        return match.group(4) if match else None

    @staticmethod
    def destination_node(dst: str) -> str:
        """Node name of a destination: `a3.h1<q>` -> `a3.h1`; `m2` -> `m2`."""
        match = _DST_RE.match(dst)
        return match.group(1) if match else dst

    def check_fits(self, spec: ModelSpec) -> None:
        """Raise `GraphMismatchError` unless this graph was built for a model with `spec`'s shape.

        Sizes the graph does not know (0: a circuit file whose cfg lacks them, as EAP-IG's and MIB's carry
        only the layer and head counts) are taken from `spec`.
        """
        shape = (
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "parallel_attn_mlp",
            "per_head_sources",
            "mixer_layers",
            "layers_without_mlp",
            "parallel_mixer_layers",
        )
        sizes = ("d_model", "d_head", "d_mlp")
        mine, theirs = asdict(self.spec), asdict(spec)
        wrong = [f for f in shape if mine[f] != theirs[f]] + [
            f for f in sizes if mine[f] and mine[f] != theirs[f]
        ]
        if wrong:
            got = ", ".join(f"{f} {mine[f]}" for f in wrong)
            want = ", ".join(f"{f} {theirs[f]}" for f in wrong)
            raise GraphMismatchError(
                f"graph built for a model with {got} does not fit model '{spec.name}' with {want}"
            )
        unknown = {f: theirs[f] for f in sizes if not mine[f]}
        if unknown:
            self.spec = replace(self.spec, **unknown)

    # ------------------------------------------------------------------------------- summaries
    def count_by_kind(self) -> dict[str, int]:
        """Counts of nodes and edges by kind."""
        counts: Counter[str] = Counter()
        counts["nodes: input"] = 1
        attention = "attention heads" if self.spec.per_head_sources else "attention layers"
        counts[f"nodes: {attention}"] = len(self.spec.attention_layers) * self.spec.n_attn_sources
        mixers = len(self.spec.mixer_layers) + len(self.spec.parallel_mixer_layers)
        if mixers:
            counts["nodes: mixers"] = mixers
        counts["nodes: MLPs"] = self.spec.n_layers - len(self.spec.layers_without_mlp)
        counts["nodes: logits"] = 1
        per_dst = self.valid.sum(0)
        for j, dst in enumerate(self.destinations):
            match = _DST_RE.match(dst)
            kind = (
                f"edges into {match.group(4)} inputs"
                if match
                else "edges into logits"
                if dst == "logits"
                else "edges into mixers"
                if dst.startswith("mix")
                else "edges into MLPs"
            )
            counts[kind] += int(per_dst[j])
        counts["edges: total"] = self.n_edges
        counts["edges: in circuit"] = self.n_in_graph
        return dict(counts)

    def summary(self) -> str:
        """A readable table of node and edge counts."""
        s = self.spec
        lines = [
            f"Graph of {s.name or 'model'}: {s.n_layers} layers, {s.n_heads} heads per layer "
            f"({s.n_kv_heads} key/value heads), d_model {s.d_model}",
        ]
        lines += [f"  {kind:<28}{count:>10,}" for kind, count in self.count_by_kind().items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Graph({self.spec.name!r}, {self.n_sources} sources, {self.n_destinations} destinations, "
            f"{self.n_edges} edges)"
        )

    # -------------------------------------------------------------------------------- networkx
    def to_networkx(self, circuit_only: bool = True) -> nx.MultiDiGraph:
        """A networkx MultiDiGraph of nodes (`input`, `a0.h1`, `m0`, `logits`) and scored edges.

        Parallel edges into one head's q, k and v inputs are kept apart by the edge attribute `qkv`.
        """
        g = nx.MultiDiGraph()
        mask = self.valid & self.in_graph if circuit_only else self.valid
        rows, cols = mask.nonzero(as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist()):
            dst = self.destinations[c]
            match = _DST_RE.match(dst)
            for reader in self.readers(c):
                g.add_edge(
                    self.sources[r],
                    reader,
                    key=f"{self.sources[r]}->{dst}",
                    score=float(self.scores[r, c]),
                    qkv=match.group(4) if match else None,
                )
        return g

    def readers(self, dst: int) -> list[str]:
        """The nodes reading destination `dst`: its head (a key/value head's: every query head of its
        group), its MLP, a post-norm layer's attention, logits."""
        name = self.destinations[dst]
        match = _DST_RE.match(name)
        if match is None:
            return [name]
        if not self.spec.per_head_sources:
            return [f"a{match.group(2)}"]
        if ".kv" not in name:
            return [match.group(1)]
        group = self.spec.n_heads // self.spec.n_kv_heads
        first = int(match.group(3)) * group
        return [f"a{match.group(2)}.h{h}" for h in range(first, first + group)]

    # ------------------------------------------------------------------------------------ files
    def cfg(self) -> dict[str, Any]:
        """The model cfg as EAP-IG / MIB circuit files carry it."""
        cfg = asdict(self.spec)
        cfg["n_key_value_heads"] = cfg.pop("n_kv_heads")
        return cfg

    def to_json(self, path: str | Path, scores: bool = True, sign: ScoreSign = "metric") -> None:
        """Write an EAP-IG / MIB-compatible circuit file (`cfg`, `nodes`, `edges` with score, in_graph;
        without `scores`, in_graph only, as MIB's circuit submissions).

        sign: "metric" writes the scores as they are, M(ablated) - M(clean) (EAP-IG's `loss=False`: an
            edge that helps is negative); "loss" writes them negated, as MIB attributes (`loss=True`: an
            edge that helps is positive, and MIB's signed curve takes the highest first). The file says
            which in `score_sign`, and `from_json` turns either back into this toolkit's sign.
        """
        flip = _flip(sign)
        nodes: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(self.sources):
            nodes[name] = {"in_graph": bool(self.nodes_in_graph[i])}
            if scores and self.node_scores is not None:
                nodes[name]["score"] = flip * float(self.node_scores[i])
        nodes["logits"] = {"in_graph": True}
        rows, cols = self.valid.nonzero(as_tuple=True)
        values = (flip * self.scores[rows, cols]).tolist()
        flags = self.in_graph[rows, cols].tolist()
        edges = {
            f"{self.sources[r]}->{self.destinations[c]}": (
                {"score": v, "in_graph": bool(f)} if scores else {"in_graph": bool(f)}
            )
            for r, c, v, f in zip(rows.tolist(), cols.tolist(), values, flags)
        }
        data: dict[str, Any] = {"cfg": self.cfg(), "nodes": nodes, "edges": edges}
        if self.metric is not None:
            data["metric"] = self.metric  # EAP-IG and MIB read cfg, nodes and edges only
        if scores:
            data["score_sign"] = sign
        Path(path).write_text(json.dumps(data))

    @classmethod
    def from_json(cls, path: str | Path, sign: ScoreSign = "metric") -> Graph:
        """Read a circuit file written by `to_json`, EAP-IG's `Graph.to_json` or MIB.

        sign: the orientation of a file that does not state its own (`score_sign`, which wins): "metric"
            for EAP-IG's default `loss=False`, "loss" for MIB's importance files; "loss" scores are
            negated into this toolkit's M(ablated) - M(clean).
        Every field is checked: a problem raises `FileFormatError` naming the file and the JSON path of
        the field (`edges["a0.h1->m0"].in_graph`), an edge the cfg's graph lacks `GraphMismatchError`.
        """
        return cls.from_dict(_read_json(Path(path)), str(path), sign)

    @classmethod
    def from_dict(cls, data: Any, where: str, sign: ScoreSign = "metric") -> Graph:
        """The graph a parsed circuit file (`cfg`, `nodes`, `edges`) describes; `where` names the source
        in errors, `sign` the scores' orientation when the file does not say (`from_json`)."""
        if not isinstance(data, dict):
            raise FileFormatError(f"{where}: a circuit file is a JSON object, got {type(data).__name__}")
        missing = {"cfg", "nodes", "edges"} - set(data)
        if missing:
            raise FileFormatError(f"{where}: not a circuit file, missing keys {sorted(missing)}")
        for key in ("cfg", "nodes", "edges"):
            _expect(isinstance(data[key], dict), where, key, "an object", data[key])
        spec, rename = _file_layout(_spec_from_cfg(data["cfg"], where), list(data["edges"]), where)
        graph = cls(spec)
        graph.metric = _metric_field(data, where)
        node_scores = torch.full((graph.n_sources,), float("nan"))
        for name, info in data["nodes"].items():
            field = f"nodes[{name!r}]"
            _expect(isinstance(info, dict), where, field, "an object", info)
            if name == "logits":
                continue
            if name not in graph.src_index:
                raise GraphMismatchError(f"{where}: {field}: no such node in the graph its cfg describes")
            i = graph.src_index[name]
            graph.nodes_in_graph[i] = _bool(info.get("in_graph", True), where, f"{field}.in_graph")
            score = _score(info.get("score"), where, f"{field}.score")
            if score is not None:
                node_scores[i] = score
            neurons = info.get("neurons")
            if neurons is not None and not (isinstance(neurons, list) and all(n is True for n in neurons)):
                raise FileFormatError(
                    f"{where}: {field}.neurons: a neuron-level circuit (some neurons left out) cannot be "
                    "read as a graph of whole nodes; this toolkit's circuits are edge / node level"
                )
        if not node_scores.isnan().all():
            graph.node_scores = node_scores
        graph.in_graph.zero_()
        for name, info in data["edges"].items():
            field = f"edges[{name!r}]"
            _expect(isinstance(info, dict), where, field, "an object", info)
            try:
                r, c = graph.edge_index(rename(name))
            except GraphMismatchError as err:
                raise GraphMismatchError(f"{where}: {field}: {err}") from None
            graph.scores[r, c] = _score(info.get("score"), where, f"{field}.score") or 0.0
            graph.in_graph[r, c] = _bool(info.get("in_graph", False), where, f"{field}.in_graph")
        flip = _flip(_sign_field(data, where, sign))
        graph.scores *= flip
        if graph.node_scores is not None:
            graph.node_scores *= flip
        return graph

    def to_pt(self, path: str | Path, sign: ScoreSign = "metric") -> None:
        """Compact tensor file for large graphs (Llama-3-8B: 1.6M edges); `sign` as in `to_json`."""
        flip = _flip(sign)
        torch.save(
            {
                "cfg": self.cfg(),
                "scores": flip * self.scores,
                "in_graph": self.in_graph,
                "nodes_in_graph": self.nodes_in_graph,
                "node_scores": None if self.node_scores is None else flip * self.node_scores,
                "metric": self.metric,
                "score_sign": sign,
            },
            path,
        )

    @classmethod
    def from_pt(cls, path: str | Path, sign: ScoreSign = "metric") -> Graph:
        """Read a tensor file written by `to_pt` (`sign` as in `from_json`); `FileFormatError` names the
        file if it is not one. A grouped-query model's file holds the grouped or the ungrouped graph, told
        by the scores' shape."""
        where = str(path)
        try:
            data = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise FileFormatError(f"{where}: no such circuit file") from None
        except IsADirectoryError:
            raise FileFormatError(f"{where}: is a folder, not a circuit file") from None
        except Exception as err:  # torch raises RuntimeError, pickle / zip errors, EOFError alike
            raise FileFormatError(
                f"{where}: not a readable circuit .pt file ({type(err).__name__}: {err})"
            ) from None
        keys = ("cfg", "scores", "in_graph", "nodes_in_graph")
        if not isinstance(data, dict) or any(k not in data for k in keys):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise FileFormatError(f"{where}: a circuit .pt file holds {list(keys)}; found {found}")
        _expect(isinstance(data["cfg"], dict), where, "cfg", "a dict", data["cfg"])
        graph = cls(_spec_from_cfg(data["cfg"], where))
        ungrouped = cls(ungrouped_spec(graph.spec))
        if isinstance(data["scores"], Tensor) and data["scores"].shape == ungrouped.valid.shape:
            graph = ungrouped
        graph.metric = _metric_field(data, where)
        shapes = {
            "scores": graph.valid.shape,
            "in_graph": graph.valid.shape,
            "nodes_in_graph": (graph.n_sources,),
        }
        if data.get("node_scores") is not None:
            shapes["node_scores"] = (graph.n_sources,)
        for key, shape in shapes.items():
            value = data[key]
            if not isinstance(value, Tensor) or value.shape != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise GraphMismatchError(
                    f"{where}: {key} is {got}, the graph its cfg describes needs {tuple(shape)}"
                )
        graph.scores = data["scores"].float()
        graph.in_graph = data["in_graph"].bool()
        graph.nodes_in_graph = data["nodes_in_graph"].bool()
        graph.node_scores = None if data.get("node_scores") is None else data["node_scores"].float()
        flip = _flip(_sign_field(data, where, sign))
        graph.scores *= flip
        if graph.node_scores is not None:
            graph.node_scores *= flip
        return graph


def _read_json(path: Path) -> Any:
    text = read_text(path, "circuit file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FileFormatError(
            f"{path}: line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}); is the file "
            "complete?"
        ) from None


def _flip(sign: object) -> float:
    """1 for scores in this toolkit's sign ("metric"), -1 for MIB's ("loss")."""
    if sign not in SCORE_SIGNS:
        raise InputError(f"sign must be one of {', '.join(SCORE_SIGNS)}, got {sign!r}")
    return -1.0 if sign == "loss" else 1.0


def _sign_field(data: dict[str, Any], where: str, default: ScoreSign) -> ScoreSign:
    """A file's `score_sign`, else `default`."""
    sign = data.get("score_sign", default)
    _expect(sign in SCORE_SIGNS, where, "score_sign", f"one of {', '.join(SCORE_SIGNS)}", sign)
    return sign  # type: ignore[no-any-return]


def _metric_field(data: dict[str, Any], where: str) -> str | None:
    """A circuit file's optional `metric`: the name of what its scores measure."""
    metric = data.get("metric")
    _expect(metric is None or isinstance(metric, str), where, "metric", "a metric's name", metric)
    return metric


def _expect(ok: bool, where: str, field: str, wanted: str, got: Any) -> None:
    if not ok:
        raise FileFormatError(f"{where}: {field} must be {wanted}, got {json.dumps(got)[:60]}")


def _bool(value: Any, where: str, field: str) -> bool:
    _expect(isinstance(value, bool), where, field, "true or false", value)
    return bool(value)


def _score(value: Any, where: str, field: str) -> float | None:
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    _expect(ok, where, field, "a number or null", value)
    return float(value)


def _count(cfg: dict[str, Any], key: str, where: str, default: int | None = None, low: int = 1) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise FileFormatError(f"{where}: cfg lacks {key!r}")
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    _expect(ok, where, f"cfg.{key}", f"a whole number >= {low}", value)
    return int(value)


ScoreSign = Literal["metric", "loss"]  # how a file's scores are oriented (`Graph.to_json`)
SCORE_SIGNS: tuple[str, ...] = ("metric", "loss")
_KV_NAME = re.compile(r"^a(\d+)\.h(\d+)<([kv])>$")


def _file_layout(spec: ModelSpec, edges: list[str], where: str) -> tuple[ModelSpec, Callable[[str], str]]:
    """Which graph a circuit file of a grouped-query model holds, told from its edge names: ours
    (`a3.kv1<k>`: grouped), EAP-IG's / MIB's (`a3.h7<k>` for every query head: ungrouped), or this
    toolkit's before the `kv` spelling (every edge of the grouped graph, `a3.h1<k>` per key/value head:
    grouped, renamed). `FileFormatError` for a file that could be either. Returns the spec and the
    renaming of edge names into the graph's."""
    if spec.n_kv_heads == spec.n_heads:
        return spec, lambda name: name
    heads = [int(m.group(2)) for name in edges if (m := _KV_NAME.match(name.split("->")[-1]))]
    if any(".kv" in name for name in edges):
        if heads:
            raise FileFormatError(f"{where}: mixes key/value inputs named a{{l}}.kv{{g}} and a{{l}}.h{{h}}")
        return spec, lambda name: name
    ungrouped = ungrouped_spec(spec)
    if not heads or max(heads) >= spec.n_kv_heads or len(edges) == Graph(ungrouped).n_edges:
        return ungrouped, lambda name: name  # EAP-IG / MIB: a k and a v input per query head
    if len(edges) == Graph(spec).n_edges:
        return spec, lambda name: re.sub(r"\.h(\d+)<([kv])>$", r".kv\1<\2>", name)
    raise FileFormatError(
        f"{where}: the cfg says {spec.n_heads} query heads share {spec.n_kv_heads} key/value heads, and the "
        f"file's {len(edges)} edges (neither graph's full count) name key/value inputs a{{l}}.h{{h}}<k|v> "
        f"only for heads below {spec.n_kv_heads}: they could be EAP-IG's inputs of query heads (the "
        "ungrouped graph) or an older file of this toolkit's inputs of key/value heads. Write the file "
        "again with every edge (EAP-IG's to_json does), or with this toolkit's a{l}.kv{g} names"
    )


def _spec_from_cfg(cfg: dict[str, Any], where: str) -> ModelSpec:
    """ModelSpec from a circuit file's cfg (ours, or EAP-IG's HookedTransformerConfig subset); sizes it
    lacks are 0 (unknown) and filled in from the model by `Graph.check_fits`."""
    n_heads = _count(cfg, "n_heads", where)
    kv_key = "n_key_value_heads" if cfg.get("n_key_value_heads") is not None else "n_kv_heads"
    parallel = cfg.get("parallel_attn_mlp", False)
    _expect(isinstance(parallel, bool), where, "cfg.parallel_attn_mlp", "true or false", parallel)
    per_head = cfg.get("per_head_sources", True)
    _expect(isinstance(per_head, bool), where, "cfg.per_head_sources", "true or false", per_head)
    mixers, without_mlp, beside = (
        _layers(cfg, key, where) for key in ("mixer_layers", "layers_without_mlp", "parallel_mixer_layers")
    )
    try:
        return ModelSpec(
            n_layers=_count(cfg, "n_layers", where),
            n_heads=n_heads,
            n_kv_heads=_count(cfg, kv_key, where, n_heads),
            d_model=_count(cfg, "d_model", where, 0, low=0),
            d_head=_count(cfg, "d_head", where, 0, low=0),
            d_mlp=_count(cfg, "d_mlp", where, 0, low=0),
            parallel_attn_mlp=parallel,
            name=str(cfg.get("name") or cfg.get("model_name") or ""),  # ours, or TransformerLens's
            per_head_sources=per_head,
            mixer_layers=mixers,
            layers_without_mlp=without_mlp,
            parallel_mixer_layers=beside,
        )
    except InputError as err:
        raise FileFormatError(f"{where}: cfg: {err}") from None


def _layers(cfg: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    """A cfg's list of layer indices (absent: none)."""
    layers = cfg.get(key, [])
    _expect(
        isinstance(layers, (list, tuple))
        and all(isinstance(i, int) and not isinstance(i, bool) for i in layers),
        where,
        f"cfg.{key}",
        "a list of layer indices",
        layers,
    )
    return tuple(layers)


def _not_emptied(circuit: Graph, chosen: int) -> Graph:
    """`circuit`, with a `CircuitsWarning` when a non-empty selection was pruned to nothing."""
    if chosen > 0 and circuit.n_in_graph == 0:
        warnings.warn(
            f"the selection ({chosen} chosen) was pruned to an empty circuit: none of its edges lies on a "
            "path from the input to the logits within it, so every edge will be ablated. Select more edges, "
            "or check that the graph was scored for this task (and with which ablation)",
            CircuitsWarning,
            stacklevel=3,
        )
    return circuit
