"""An independent brute-force reference for any hooked architecture: one forward pass per edge.

Written apart from the engine: no closed-form norm pull-backs, no per-head weight reshapes, no batching of
patches. Source outputs come from the model's own forward passes (a head's result is the attention output
with only its z kept, minus that with none; a post-norm layer's attention source is its normed attention
output); a destination's input is patched by
recomputing, with the real norm and projection modules, what the destination reads from `resid + delta`:
- `a{l}.h{h}<q|k|v>`: the projection's output slice of head h (for a q projection that also computes the
  heads' output gates, Qwen3.5's, both; where a projection of their own computes the gates, AFMoE's and
  Laguna's, its slice too), from norm(resid + delta); where a q/k norm
  normalises all heads' projections together (OLMo-2), that norm's output slice, from
  qk_norm(proj(norm(resid + delta)));
- `m{l}`: the MLP norm's input + delta (the MLP's input + delta where it has no norm), or with a norm
  shared with attention, norm(resid + delta);
- `mix{l}` (a layer whose token mixer is no attention): the layer's first norm's input + delta (`ln1`, or
  `norm` in Mamba's blocks); beside attention (Falcon-H1), the mixer's input rebuilt as norm(resid + delta);
- `logits`: the final norm's input + delta.
EAP's reference is the same patch made differentiable: dM/d(delta_v) at delta_v = 0, dotted with each
source's corrupted - clean difference.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor

from circuits.data import PromptPairs
from circuits.graph import Graph
from circuits.metrics import logit_diff
from circuits.models import HookedModel

_HEAD_INPUT = re.compile(r"a(\d+)\.(?:h|kv)(\d+)<([qkv])>$")


def _module(model: HookedModel, path: str) -> torch.nn.Module:
    """The Hugging Face module behind a bridge component, e.g. `blocks.0.attn.q`."""
    module = model.bridge.get_submodule(path)
    return getattr(module, "original_component", module)


def source_outputs(model: HookedModel, ids: Tensor) -> dict[str, Tensor]:
    """Every source's output [b, P, d_model] as it enters the residual stream, in plain forward passes.

    A head's output is read where the layer's attention output enters the residual (`hook_attn_out`) in a
    pass with every other head's z set to zero, minus the same with all z zero: whatever the block does to
    the projected heads on the way (a bias, Granite's residual multiplier) is the model's own.
    """
    spec = model.spec
    captured: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[[Tensor], None]:
        return lambda x: captured.__setitem__(name, x.detach().clone())

    hooks = [("blocks.0.hook_resid_pre", keep("input"))]
    attention = [layer for layer in range(spec.n_layers) if layer not in spec.mixer_layers]
    for layer in attention:
        hooks += [(f"blocks.{layer}.attn.o.hook_in", keep(f"z{layer}"))]
        hooks += [(f"blocks.{layer}.hook_attn_out", keep(f"a{layer}"))]
    for layer in spec.parallel_mixer_layers:  # beside the heads: the mixer component's output
        hooks += [(f"blocks.{layer}.mamba.hook_out", keep(f"mix{layer}"))]
    for layer in spec.mixer_layers:  # alone in its layer: what the layer adds besides its MLP
        hooks += [(f"blocks.{layer}.hook_resid_pre", keep(f"pre{layer}"))]
        hooks += [(f"blocks.{layer}.hook_resid_post", keep(f"post{layer}"))]
    with_mlp = [layer for layer in range(spec.n_layers) if layer not in spec.layers_without_mlp]
    for layer in with_mlp:
        hooks += [(f"blocks.{layer}.hook_mlp_out", keep(f"m{layer}"))]
    with torch.no_grad(), model.hooks(hooks):
        model(ids)
    out = {"input": captured["input"], **{f"m{i}": captured[f"m{i}"] for i in with_mlp}}
    out |= {f"mix{i}": captured[f"mix{i}"] for i in spec.parallel_mixer_layers}
    for i in spec.mixer_layers:
        out[f"mix{i}"] = captured[f"post{i}"] - captured[f"pre{i}"] - out.get(f"m{i}", 0.0)
    if not spec.per_head_sources:  # post-norm blocks: the normed attention output of each layer
        return out | {f"a{i}": captured[f"a{i}"] for i in attention}

    def attn_out_with(layer: int, z: Tensor) -> Tensor:
        seen: dict[str, Tensor] = {}
        swap = [
            (f"blocks.{layer}.attn.o.hook_in", lambda _x: z.flatten(2)),
            (f"blocks.{layer}.hook_attn_out", lambda x: seen.__setitem__("out", x.detach().clone())),
        ]
        with torch.no_grad(), model.hooks(swap):
            model(ids)
        return seen["out"]

    for layer in attention:
        z = captured[f"z{layer}"].reshape(*captured[f"z{layer}"].shape[:2], spec.n_heads, spec.d_head)
        zero = attn_out_with(layer, torch.zeros_like(z))
        for head in range(spec.n_heads):
            alone = torch.zeros_like(z)
            alone[:, :, head] = z[:, :, head]
            out[f"a{layer}.h{head}"] = attn_out_with(layer, alone) - zero
    return out


def _width(module: torch.nn.Module, side: str = "") -> int:
    """A norm's width (its weight's size), or a linear map's output width (`side="out"`)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return -1  # a norm without a gain (Gemma-4's): not the width of anything
    return int(weight.shape[0] if side else weight.numel())


def _patch_hooks(
    model: HookedModel, deltas: dict[str, Tensor], latent: _LatentInputs
) -> list[tuple[str, Callable]]:
    """Hooks adding deltas[dst] to each named destination's input (see module doc)."""
    spec = model.spec
    has = model.bridge.hook_dict.__contains__
    resid: dict[int, Tensor] = {}
    hooks: list[tuple[str, Callable]] = []
    for layer in range(spec.n_layers):  # the residual each attention layer's q, k and v read
        if layer in spec.mixer_layers:
            continue
        reads = (
            f"blocks.{layer}.ln1.hook_in"
            if has(f"blocks.{layer}.ln1.hook_in")
            else f"blocks.{layer}.attn.hook_in"
        )
        hooks.append((reads, lambda x, layer=layer: resid.__setitem__(layer, x)))

    def attn_norm(layer: int) -> Callable[[Tensor], Tensor]:
        return _module(model, f"blocks.{layer}.ln1") if has(f"blocks.{layer}.ln1.hook_in") else (lambda x: x)

    latent.resid, latent.attn_norm = resid, attn_norm
    for dst, delta in deltas.items():
        head_input = _HEAD_INPUT.match(dst)
        if head_input and has(f"blocks.{head_input.group(1)}.attn.hook_kv_latent"):
            layer, head, letter = int(head_input.group(1)), int(head_input.group(2)), head_input.group(3)
            hooks += latent.patch(layer, head, letter, delta)
        elif head_input:
            layer, head, letter = int(head_input.group(1)), int(head_input.group(2)), head_input.group(3)
            norm = attn_norm(layer)
            proj = _module(model, f"blocks.{layer}.attn.{letter}")
            at = f"blocks.{layer}.attn.{letter}.hook_out"
            qk_norm = f"blocks.{layer}.attn.{letter}_norm"
            if has(f"{qk_norm}.hook_out") and _width(_module(model, qk_norm)) == _width(proj, "out"):
                proj, at = torch.nn.Sequential(proj, _module(model, qk_norm)), f"{qk_norm}.hook_out"

            heads = spec.n_heads if letter == "q" else spec.n_kv_heads
            width = _width(_module(model, f"blocks.{layer}.attn.{letter}"), "out") // heads  # gates too

            def rebuild(x, layer=layer, head=head, norm=norm, proj=proj, delta=delta, width=width):
                out = x.clone()
                cols = slice(head * width, (head + 1) * width)
                out[..., cols] = proj(norm(resid[layer] + delta))[..., cols]
                return out

            hooks.append((at, rebuild))
            gate = f"blocks.{layer}.attn.gate"  # AFMoE, Laguna: a q input also feeds its head's output gate
            if letter == "q" and has(f"{gate}.hook_out"):
                width = _width(_module(model, gate), "out") // heads
                hooks.append((f"{gate}.hook_out", partial(rebuild, proj=_module(model, gate), width=width)))
        elif dst == "logits":
            hooks.append(("ln_final.hook_in", lambda x, delta=delta: x + delta))
        elif dst.startswith("mix") and int(dst[3:]) in spec.parallel_mixer_layers:  # beside attention:
            layer = int(dst[3:])  # it reads the attention norm's output, rebuilt from resid + delta
            norm = attn_norm(layer)
            hooks.append(
                (
                    f"blocks.{layer}.mamba.hook_in",
                    lambda x, layer=layer, norm=norm, delta=delta: norm(resid[layer] + delta),
                )
            )
        elif dst.startswith("mix"):  # a mixer layer's first norm (`norm` in Mamba's blocks), read by it alone
            first = next(n for n in ("ln1", "norm") if has(f"blocks.{int(dst[3:])}.{n}.hook_in"))
            hooks.append((f"blocks.{int(dst[3:])}.{first}.hook_in", lambda x, delta=delta: x + delta))
        else:
            layer = int(dst[1:])
            own_norm = f"blocks.{layer}.ln2.hook_in"
            if has(own_norm):
                hooks.append((own_norm, lambda x, delta=delta: x + delta))
            elif not (spec.parallel_attn_mlp and has(f"blocks.{layer}.ln1.hook_in")):  # no norm in front
                hooks.append((f"blocks.{layer}.mlp.hook_in", lambda x, delta=delta: x + delta))
            else:  # the MLP reads the attention norm's output
                norm = attn_norm(layer)
                hooks.append(
                    (
                        f"blocks.{layer}.mlp.hook_in",
                        lambda x, layer=layer, norm=norm, delta=delta: norm(resid[layer] + delta),
                    )
                )
    return hooks


class _LatentInputs:
    """Head inputs of multi-head latent attention, patched through the model's own attention module: its
    q (k, v) for head h is what the bridge's attention computes at `attn.hook_<letter>` when called again on
    norm(resid + delta) with the other arguments its block gave it (position embeddings, mask); head h's
    slice of that replaces head h's. While the attention runs again, every hook here only records."""

    def __init__(self, model: HookedModel) -> None:
        self.model = model
        self.resid: dict[int, Tensor] = {}
        self.attn_norm: Callable = lambda layer: lambda x: x
        self.running_again = False
        self.seen: dict[str, Tensor] = {}
        self.calls: dict[int, dict] = {}  # each latent layer's attention arguments, as its block passed them

    @contextmanager
    def recording_calls(self) -> Iterator[None]:
        """Within the block, each attention module's keyword arguments (position embeddings, mask) are kept
        for calling it again."""

        def keep(layer: int) -> Callable:
            def hook(_module, _args, kwargs) -> None:
                if not self.running_again:
                    self.calls[layer] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

            return hook

        blocks = self.model.bridge.blocks
        handles = [
            blocks[layer].attn.register_forward_pre_hook(keep(layer), with_kwargs=True)
            for layer in range(len(blocks))
            if f"blocks.{layer}.attn.hook_kv_latent" in self.model.bridge.hook_dict
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def patch(self, layer: int, head: int, letter: str, delta: Tensor) -> list[tuple[str, Callable]]:
        at = f"blocks.{layer}.attn.hook_{letter}"
        attention = self.model.bridge.blocks[layer].attn

        def rebuild(x: Tensor) -> Tensor | None:
            if self.running_again:
                self.seen[at] = x
                return None
            self.running_again = True
            try:
                x_in = self.attn_norm(layer)(self.resid[layer] + delta)
                attention(hidden_states=x_in, **self.calls[layer])
            finally:
                self.running_again = False
            width = x.shape[-1] // self.model.spec.n_heads
            out = x.clone()
            cols = slice(head * width, (head + 1) * width)
            out[..., cols] = self.seen[at][..., cols]
            return out

        return [(at, rebuild)]


def metric(
    model: HookedModel,
    pairs: PromptPairs,
    deltas: dict[str, Tensor] | None = None,
    ids: Tensor | None = None,
    extra_hooks: Sequence[tuple[str, Callable]] = (),
) -> Tensor:
    """Per-example logit difference [b] on `ids` (default: the clean prompts), with the destinations in
    `deltas` patched and any `extra_hooks` applied."""
    latent = _LatentInputs(model)
    with latent.recording_calls(), model.hooks([*_patch_hooks(model, deltas or {}, latent), *extra_hooks]):
        return logit_diff(model(pairs.clean if ids is None else ids), pairs)


def edge_factor(model: HookedModel, src: str, dst: str) -> float:
    """What the residual stream multiplies u's output by on its way to v: the product of the learned layer
    scalars (Gemma-4's `layer_scalar`, read from the Hugging Face decoder layers) of the layers from the one
    writing u (the input: layer 0) up to the one before v's (the logits: all of them)."""
    # the modules owning the buffer (the bridge's blocks forward the attribute to the layers they wrap)
    layers = [m for m in model.bridge.original_model.modules() if "layer_scalar" in m._buffers]
    scalars = [float(m.layer_scalar.reshape(-1)[0]) for m in layers] or [1.0] * model.spec.n_layers
    first = 0 if src == "input" else int(re.match(r"[a-z]+(\d+)", src).group(1))  # type: ignore[union-attr]
    last = len(scalars) if dst == "logits" else int(re.match(r"[a-z]+(\d+)", dst).group(1))  # type: ignore[union-attr]
    factor = 1.0
    for scalar in scalars[first:last]:
        factor *= scalar
    return factor


def exact_scores(
    model: HookedModel, graph: Graph, pairs: PromptPairs, positions: Tensor | None = None
) -> Tensor:
    """[n_sources, n_destinations]: M(edge patched to its corrupted value) - M(clean), mean over examples;
    with `positions` (bool [b, P], e.g. one span's), patched there only."""
    clean, corrupted = source_outputs(model, pairs.clean), source_outputs(model, pairs.corrupted)
    keep = 1.0 if positions is None else positions[..., None].to(model.dtype)
    scores = torch.zeros(graph.valid.shape, dtype=torch.float64)
    with torch.no_grad():
        base = metric(model, pairs)
        for name in graph.edge_names():
            src, dst = name.split("->")
            delta = (corrupted[src] - clean[src]) * edge_factor(model, src, dst) * keep
            patched = metric(model, pairs, {dst: delta})
            scores[graph.edge_index(name)] = (patched - base).double().mean()
    return scores


def exact_node_scores(model: HookedModel, graph: Graph, pairs: PromptPairs, positions: Tensor) -> Tensor:
    """[n_sources]: M(every edge out of the source patched at `positions`, bool [b, P]) - M(clean)."""
    clean, corrupted = source_outputs(model, pairs.clean), source_outputs(model, pairs.corrupted)
    keep = positions[..., None].to(model.dtype)
    scores = torch.zeros(graph.n_sources, dtype=torch.float64)
    with torch.no_grad():
        base = metric(model, pairs)
        for u, src in enumerate(graph.sources):
            deltas = {
                dst: (corrupted[src] - clean[src]) * edge_factor(model, src, dst) * keep
                for dst, ok in zip(graph.destinations, graph.valid[u].tolist())
                if ok
            }
            scores[u] = (metric(model, pairs, deltas) - base).double().mean()
    return scores


def destination_grads(
    model: HookedModel,
    graph: Graph,
    pairs: PromptPairs,
    ids: Tensor | None = None,
    extra_hooks: Sequence[tuple[str, Callable]] = (),
) -> dict[str, Tensor]:
    """dM/d(destination input) [b, P, d_model] for every destination, M the mean metric on `ids`."""
    shape = (*pairs.clean.shape, model.spec.d_model)
    leaves = {dst: torch.zeros(shape, dtype=model.dtype, requires_grad=True) for dst in graph.destinations}
    with torch.enable_grad():
        metric(model, pairs, leaves, ids, extra_hooks).mean().backward()
    grads = {}
    for dst, leaf in leaves.items():
        # a hook replacing an activation cuts the gradient to everything upstream of it
        assert leaf.grad is not None or extra_hooks, f"no gradient reached {dst}"
        grads[dst] = torch.zeros(shape, dtype=torch.float64) if leaf.grad is None else leaf.grad.double()
    return grads


def gradient_scores(
    graph: Graph,
    deltas: dict[str, Tensor],
    grads: dict[str, Tensor],
    sources: Sequence[str] | None = None,
    model: HookedModel | None = None,
) -> Tensor:
    """[n_sources, n_destinations]: delta_u . grad_v for the valid edges out of `sources` (default: all),
    times the residual stream's factor from u to v where `model`'s layers rescale it (`edge_factor`)."""
    scores = torch.zeros(graph.valid.shape, dtype=torch.float64)
    for name in graph.edge_names():
        src, dst = name.split("->")
        if sources is None or src in sources:
            factor = 1.0 if model is None else edge_factor(model, src, dst)
            scores[graph.edge_index(name)] = factor * (deltas[src].double() * grads[dst]).sum()
    return scores


def eap_scores(model: HookedModel, graph: Graph, pairs: PromptPairs) -> Tensor:
    """[n_sources, n_destinations]: (corrupted - clean source output) . dM/d(destination input)."""
    clean, corrupted = source_outputs(model, pairs.clean), source_outputs(model, pairs.corrupted)
    deltas = {name: corrupted[name] - clean[name] for name in clean}
    return gradient_scores(graph, deltas, destination_grads(model, graph, pairs), model=model)


def qk_fix_scores(
    model: HookedModel, graph: Graph, pairs: PromptPairs, positions: Tensor | None = None
) -> dict[str, float]:
    """AtP*'s QK-fixed score of each q/k edge from the pattern its patch really produces: sum (A_patched
    - A) . dM/dA, A_patched read from a forward pass with only that edge patched (at `positions`, bool
    [b, P], when given), dM/dA from a clean backward pass."""
    clean, corrupted = source_outputs(model, pairs.clean), source_outputs(model, pairs.corrupted)
    keep_at = 1.0 if positions is None else positions[..., None].to(model.dtype)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, grad: bool = False):
        def hook(x):
            seen[name] = x.detach()
            if grad:
                y = x.view_as(x)
                y.register_hook(lambda g: seen.__setitem__(name + ":grad", g))
                return y
            return None

        return hook

    layers = range(model.spec.n_layers)
    hooks = [(model.input_hook, lambda x: x.detach().requires_grad_(True))]
    hooks += [(model.attn_pattern_hook(layer), keep(f"A{layer}", grad=True)) for layer in layers]
    with torch.enable_grad(), model.hooks(hooks):
        logit_diff(model(pairs.clean), pairs).mean().backward()
    reference = {}
    for name in graph.edge_names():
        src, dst = name.split("->")
        if "<q>" not in dst and "<k>" not in dst:
            continue
        layer = int(dst[1 : dst.index(".")])
        patched = [(model.attn_pattern_hook(layer), keep("patched"))]
        with torch.no_grad():
            metric(model, pairs, {dst: (corrupted[src] - clean[src]) * keep_at}, extra_hooks=patched)
        change = seen["patched"] - seen[f"A{layer}"]
        reference[name] = float((change * seen[f"A{layer}:grad"]).sum())
    return reference


def crossing_scores(
    model: HookedModel, pairs: PromptPairs, span_index: Tensor, n_spans: int
) -> dict[tuple[int, int, int, int, int], tuple[float, float]]:
    """Crossing edges patched one at a time, for prompts of equal lengths: {(key / value span a, query span
    b, layer, query head h, letter 0 = k / 1 = v): (exact, PEAP's score)}, means over examples.

    Head h's output z_h at layer l is recomputed with the k (v) projection's output at span a's positions
    taken from the corrupted run (a forward pass with that patch, read at the output projection's input);
    the exact score adds z_h(patched) - z_h(clean) to the clean run's z at span b's queries, PEAP's score
    dots that difference with dM/dz_h there."""
    spec = model.spec
    d_head = spec.d_head

    def run(hooks: list[tuple[str, Callable]], ids: Tensor) -> dict[str, Tensor]:
        seen: dict[str, Tensor] = {}

        def keep(name: str) -> Callable:
            return lambda x: seen.__setitem__(name, x.detach().clone())

        keeps = [
            (f"blocks.{layer}.attn.{n}", keep(f"{layer}.{n}"))
            for layer in range(spec.n_layers)
            for n in ("k.hook_out", "v.hook_out", "o.hook_in")
        ]
        with torch.no_grad(), model.hooks([*keeps, *hooks]):
            model(ids)
        return seen

    clean, corrupted = run([], pairs.clean), run([], pairs.corrupted)
    base = metric(model, pairs)
    z_leaves = {  # zeros added to each layer's z: their gradient is dM/dz, every path through z kept
        layer: torch.zeros_like(clean[f"{layer}.o.hook_in"], requires_grad=True)
        for layer in range(spec.n_layers)
    }
    with torch.enable_grad():
        added = [(f"blocks.{layer}.attn.o.hook_in", lambda x, z=z: x + z) for layer, z in z_leaves.items()]
        metric(model, pairs, extra_hooks=added).mean().backward()
    out = {}
    for layer in range(spec.n_layers):
        for letter, name in enumerate(("k", "v")):
            hook = f"blocks.{layer}.attn.{name}.hook_out"
            for a in range(n_spans):
                at_a = (span_index == a)[..., None]
                if not bool(at_a.any()):
                    continue
                value = corrupted[f"{layer}.{name}.hook_out"]
                swap = [(hook, lambda x, at_a=at_a, value=value: torch.where(at_a, value, x))]
                patched = run(swap, pairs.clean)[f"{layer}.o.hook_in"]
                dz = patched - clean[f"{layer}.o.hook_in"]
                for b in range(a, n_spans):
                    at_b = (span_index == b)[..., None]
                    if not bool(at_b.any()):
                        continue
                    for h in range(spec.n_heads):
                        cols = slice(h * d_head, (h + 1) * d_head)
                        add = torch.zeros_like(dz)
                        add[..., cols] = (dz * at_b)[..., cols]
                        with torch.no_grad():
                            moved = metric(
                                model,
                                pairs,
                                extra_hooks=[(f"blocks.{layer}.attn.o.hook_in", lambda x, add=add: x + add)],
                            )
                        exact = float((moved - base).double().mean())
                        peap = float((add.double() * z_leaves[layer].grad.double()).sum())
                        out[(a, b, layer, h, letter)] = (exact, peap)
    return out


def without_crossing_edges(
    model: HookedModel,
    pairs: PromptPairs,
    span_index: Tensor,
    layer: int,
    removed: set[tuple[int, int, int, int]],
) -> Tensor:
    """[b] the metric with the crossing edges `removed` = {(key / value span a, query span b, query head h,
    letter 0 = k / 1 = v)} of one layer ablated, for prompts of equal lengths: for each head and query
    span, its output z recomputed in a forward pass with the k (v) projection's output at those key spans
    taken from the corrupted run, then written into the clean run at that span's queries."""
    spec = model.spec
    d_head = spec.d_head
    z_hook = f"blocks.{layer}.attn.o.hook_in"

    def run(hooks: list[tuple[str, Callable]], ids: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        seen: dict[str, Tensor] = {}
        keeps = [(n, lambda x, n=n: seen.__setitem__(n, x.detach().clone())) for n in names]
        with torch.no_grad(), model.hooks([*hooks, *keeps]):
            model(ids)
        return seen

    kv = [f"blocks.{layer}.attn.{name}.hook_out" for name in ("k", "v")]
    corrupted = run([], pairs.corrupted, kv)
    z = run([], pairs.clean, [z_hook])[z_hook].clone()
    heads = {h for _, _, h, _ in removed}
    spans = {b for _, b, _, _ in removed}
    for h in heads:
        cols = slice(h * d_head, (h + 1) * d_head)
        for b in spans:
            patches = []
            for letter, hook in enumerate(kv):
                at = torch.zeros_like(span_index, dtype=torch.bool)
                for a, b2, h2, letter2 in removed:
                    if (b2, h2, letter2) == (b, h, letter):
                        at |= span_index == a
                value = corrupted[hook]
                patches.append((hook, lambda x, at=at[..., None], value=value: torch.where(at, value, x)))
            patched = run(patches, pairs.clean, [z_hook])[z_hook]
            queries = (span_index == b)[..., None]
            z[..., cols] = torch.where(queries, patched[..., cols], z[..., cols])
    with torch.no_grad():
        return metric(model, pairs, extra_hooks=[(z_hook, lambda _x: z)])
