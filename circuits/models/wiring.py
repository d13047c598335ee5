"""One map from the graph to the model (the wiring): the blocks of graph indices a model's shape gives
(`blocks`), and for each block the hook points that carry its value (`wiring`). `circuits.graph.Graph`
names its nodes from the blocks; code that records source outputs, patches destination inputs or reads
their gradients loops over the sites with a `match` on the kind. Nothing else works out graph indices.

Sources (`SourceSite.hook` carries their value; `output_hook` is where their sum enters the residual):

    input      `input`                the residual stream entering block 0              [B, P, d]
    heads      `a{l}.h{h}`            the heads' mixed values before W_O, per head      [B, P, H, d_head]
                                      (head h's output is z_h W_O[h]: `HookedModel.head_results`)
    attention  `a{l}` (post-norm)     the layer's normed attention output                [B, P, d]
    mixer      `mix{l}`               a mixer layer's output (no attention: Qwen3.5)     [B, P, d]
    mlp        `m{l}`                 the MLP's output                                   [B, P, d]

Destinations (`DestinationSite.hook` is where the input is patched and its gradient read):

    q, k, v    `a{l}.h{h}<q>` ...     the projection's output [B, P, n * d_head] (past a q/k norm over all
                                      heads, that norm's output), rebuilt per head from the residual read
                                      at `residual_hook` (the attention norm's input)
    mixer      `mix{l}`               the input of the layer's first norm, which only the mixer reads
    mlp        `m{l}`                 `HookedModel.mlp_destination_hook`; with `residual_hook` set, the MLP
                                      reads through the attention norm it shares (parallel blocks)
    logits     `logits`               the final norm's input                             [B, P, d]

A new block layout, an ungrouped graph or a per-position graph changes this table and the kinds it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from circuits.models.hooked import QKV, QKV_LETTERS, HookedModel, ModelSpec

SourceKind = Literal["input", "heads", "attention", "mixer", "mlp"]
DestinationKind = Literal["q", "k", "v", "mixer", "mlp", "logits"]


@dataclass(frozen=True)
class Block:
    """A run of graph indices one component owns: the sources of the input, of a layer's heads (or its
    one post-norm attention output) or of its MLP; the destinations of a layer's q, k or v inputs, of its
    MLP's input, or the logits. `order` is its place in the forward pass: an edge runs from a source to
    a destination of larger order."""

    kind: SourceKind | DestinationKind
    layer: int  # -1 for the input, n_layers for the logits
    indices: slice
    order: int

    def __len__(self) -> int:
        return self.indices.stop - self.indices.start


def blocks(spec: ModelSpec) -> tuple[list[Block], list[Block]]:
    """(source blocks, destination blocks) of the graph of a model of shape `spec`, in index order.

    Sources: input, then per layer its heads (one per query head; one `attention` source for post-norm
    blocks; one `mixer` for a layer without attention), a mixer beside the heads where there is one
    (Falcon-H1) and its MLP. Destinations: per layer one q input per query head, one k and one v input
    per key-value head (grouped-query attention is native) or the mixer's input, the input of a mixer
    beside the heads, the MLP's input (a layer may have none: Mamba); then the logits.
    """
    sources: list[Block] = []
    destinations: list[Block] = []

    def add(side: list[Block], kind: SourceKind | DestinationKind, layer: int, n: int, order: int) -> None:
        start = side[-1].indices.stop if side else 0
        side.append(Block(kind, layer, slice(start, start + n), order))

    add(sources, "input", -1, 1, 0)
    for layer in range(spec.n_layers):
        attention, mlp = 2 * layer + 1, 2 * layer + 2  # the order of the layer's two residual writes
        if not spec.has_attention(layer):
            add(sources, "mixer", layer, 1, attention)
        elif spec.per_head_sources:
            add(sources, "heads", layer, spec.n_heads, attention)
        else:
            add(sources, "attention", layer, 1, attention)
        beside = layer in spec.parallel_mixer_layers  # a mixer beside the heads, writing with them
        if beside:
            add(sources, "mixer", layer, 1, attention)
        if spec.has_mlp(layer):
            add(sources, "mlp", layer, 1, mlp)
        if not spec.has_attention(layer):
            add(destinations, "mixer", layer, 1, attention)
        for letter in QKV_LETTERS if spec.has_attention(layer) else ():
            add(destinations, letter, layer, spec.n_qkv_heads(letter), attention)
        if beside:
            add(destinations, "mixer", layer, 1, attention)
        if spec.has_mlp(layer):
            add(destinations, "mlp", layer, 1, attention if spec.parallel_attn_mlp else mlp)
    add(destinations, "logits", spec.n_layers, 1, 2 * spec.n_layers + 1)
    return sources, destinations


@dataclass(frozen=True)
class SourceSite:
    """Sources one component writes, and the hooks that carry them."""

    kind: SourceKind
    layer: int  # -1 for the input
    sources: slice  # graph source indices
    hook: str  # carries their value (per head for `heads`)
    output_hook: str  # where their summed output enters the residual stream

    @property
    def per_head(self) -> bool:
        """The hook carries per-head values z (their outputs are `HookedModel.head_results`)."""
        return self.kind == "heads"


@dataclass(frozen=True)
class DestinationSite:
    """Destinations one component reads, and the hooks where they are patched and differentiated."""

    kind: DestinationKind
    layer: int  # n_layers for the logits
    destinations: slice  # graph destination indices
    hook: str
    residual_hook: str | None = None  # the residual the input is rebuilt from (q, k, v; a shared-norm MLP)
    gate_hook: str | None = None  # q: where the heads' output gates are, when a projection of their own
    # computes them from the same residual (`HookedModel.head_gate_hook`): patched and read with the queries

    @property
    def letter(self) -> QKV | None:
        return self.kind if self.kind in ("q", "k", "v") else None  # type: ignore[return-value]


@dataclass(frozen=True)
class Wiring:
    """Every source site in source order and every destination site in destination order."""

    sources: tuple[SourceSite, ...]
    destinations: tuple[DestinationSite, ...]

    @property
    def groups(self) -> list[slice]:
        """The sources sharing one summed output (and one gradient): input, then per layer its attention
        sources and its MLP."""
        return [site.sources for site in self.sources]


def _build(model: HookedModel, spec: ModelSpec) -> Wiring:
    source_blocks, destination_blocks = blocks(spec)
    sources = []
    for block in source_blocks:
        layer = block.layer
        match block.kind:
            case "input":
                hook = output = model.input_hook
            case "heads":
                hook, output = model.head_z_hook(layer), model.attn_out_hook(layer)
            case "attention":
                hook = output = model.attn_out_hook(layer)
            case "mixer":
                hook = output = model.mixer_out_hook(layer)
            case "mlp":
                hook = output = model.mlp_out_hook(layer)
            case other:
                raise AssertionError(f"a source block of kind {other}")
        sources.append(SourceSite(block.kind, layer, block.indices, hook, output))
    destinations = []
    for block in destination_blocks:
        layer = block.layer
        residual = gate = None
        match block.kind:
            case "q" | "k" | "v":
                hook = model.head_input_hook(layer, block.kind)
                residual = model.attn_norm_in_hook(layer)
                gate = model.head_gate_hook(layer) if block.kind == "q" else None
            case "mixer" if layer in spec.parallel_mixer_layers:  # reads the attention norm's output too
                hook, residual = model.mixer_in_hook(layer), model.attn_norm_in_hook(layer)
            case "mixer":
                hook = model.attn_norm_in_hook(layer)
            case "mlp":
                hook = model.mlp_destination_hook(layer)
                if model.mlp_shares_attn_norm:
                    residual = model.attn_norm_in_hook(layer)
            case "logits":
                hook = model.final_norm_in_hook
            case other:
                raise AssertionError(f"a destination block of kind {other}")
        destinations.append(DestinationSite(block.kind, layer, block.indices, hook, residual, gate))
    return Wiring(tuple(sources), tuple(destinations))


def residual_factors(model: HookedModel, spec: ModelSpec | None = None) -> tuple[Tensor, Tensor] | None:
    """What the residual stream multiplies a source's hooked output by on its way to a destination, as a
    per-source factor c_u / P_j and a per-destination factor P_m (float64): P_l = s_0 ... s_{l-1} the
    product of the layer scalars before layer l (`HookedModel.layer_scalars`, Gemma-4), j the layer writing
    the source (0 for the input), m the layer whose residual the destination reads (n_layers for the
    logits), c_u the factor the block applies to the source's hooked output (`HookedModel.mixer_scale`,
    Granite-4's multiplier on its Mamba mixers; 1 elsewhere). Edge u -> v carries c_u P_m / P_j times u's
    hooked output; None where every factor is 1."""
    spec = model.spec if spec is None else spec
    scalars = model.layer_scalars()
    own = {layer: model.mixer_scale(layer) for layer in range(spec.n_layers) if spec.has_mixer(layer)}
    if scalars is None and all(c == 1.0 for c in own.values()):
        return None
    scalars = [1.0] * spec.n_layers if scalars is None else scalars
    before = torch.cumprod(torch.tensor([1.0, *scalars], dtype=torch.float64), 0)  # [n_layers + 1]
    sites = wiring(model, spec)
    sources = torch.cat(
        [
            ((own[s.layer] if s.kind == "mixer" else 1.0) / before[max(s.layer, 0)]).repeat(
                s.sources.stop - s.sources.start
            )
            for s in sites.sources
        ]
    )
    destinations = torch.cat(
        [before[d.layer].repeat(d.destinations.stop - d.destinations.start) for d in sites.destinations]
    )
    return sources, destinations


_BUILT: WeakKeyDictionary[HookedModel, dict[ModelSpec, Wiring]] = WeakKeyDictionary()


def wiring(model: HookedModel, spec: ModelSpec | None = None) -> Wiring:
    """The sites of the graph of shape `spec` (a `Graph`'s; default the model's own) on `model`, built once
    per model and shape."""
    spec = model.spec if spec is None else spec
    per_model = _BUILT.setdefault(model, {})
    if spec not in per_model:
        per_model[spec] = _build(model, spec)
    return per_model[spec]
