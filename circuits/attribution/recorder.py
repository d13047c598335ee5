"""Hooks shared by every method: record source outputs, gradients at destinations and at sources.

Layouts (B rows in the forward pass; with IG steps in the batch, B = steps x b, row = k * b + i):
- source outputs   [B, P, n_sources, d_model]   (`input`, each head's result z_h W_O[h], each MLP output)
- dst gradients    [b, P, n_destinations, d_model], summed over steps with quadrature weights
- source gradients [b, P, 2 * n_layers + 1, d_model]: one per source group (input, layer l's heads, which
  all share the gradient at the attention output, layer l's MLP), summed over steps likewise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from circuits.graph import Graph
from circuits.models.hooked import HookedModel, HookFn


def group_of_head_layer(layer: int) -> int:
    return 1 + 2 * layer


def group_of_mlp_layer(layer: int) -> int:
    return 2 + 2 * layer


def source_group_index(graph: Graph) -> Tensor:
    """[n_sources] index of each source's group (0 = input, 1 + 2l = heads of l, 2 + 2l = MLP l)."""
    groups = torch.zeros(graph.n_sources, dtype=torch.long)
    for layer in range(graph.spec.n_layers):
        groups[graph.head_sources(layer)] = group_of_head_layer(layer)
        groups[graph.mlp_source(layer)] = group_of_mlp_layer(layer)
    return groups


def source_hooks(model: HookedModel, graph: Graph, out: Tensor) -> list[tuple[str, HookFn]]:
    """Hooks writing every source's output into `out` [B, P, n_sources, d_model] (no grad)."""

    def write(index: int | slice, transform: Callable[[Tensor], Tensor] | None = None) -> HookFn:
        def fn(x: Tensor) -> None:
            with torch.no_grad():
                out[:, : x.shape[1], index] = (transform(x) if transform else x).to(out.dtype)

        return fn

    hooks = [(model.input_hook, write(0))]
    for layer in range(graph.spec.n_layers):
        hooks.append(
            (model.head_z_hook(layer), write(graph.head_sources(layer), _head_results(model, layer)))
        )
        hooks.append((model.mlp_out_hook(layer), write(graph.mlp_source(layer))))
    return hooks


def _head_results(model: HookedModel, layer: int) -> Callable[[Tensor], Tensor]:
    w_o = model.W_O(layer)
    spec = model.spec

    def results(z: Tensor) -> Tensor:
        z = z.reshape(*z.shape[:2], spec.n_heads, spec.d_head)
        return torch.einsum("bpnh,nhd->bpnd", z, w_o.to(z.dtype))

    return results


class GradientRecorder:
    """Backward hooks accumulating weighted gradients at destinations and source groups.

    Args:
        weights: [steps] quadrature weights; the forward batch holds steps x b rows, step-major.
        dst_grads: [b, P, n_destinations, d] buffer to add into, or None to skip destinations.
        src_grads: [b, P, 2 n_layers + 1, d] buffer to add into, or None to skip sources.
    """

    def __init__(
        self,
        model: HookedModel,
        graph: Graph,
        weights: Tensor,
        dst_grads: Tensor | None,
        src_grads: Tensor | None,
    ) -> None:
        self.model, self.graph, self.weights = model, graph, weights
        self.dst_grads, self.src_grads = dst_grads, src_grads
        self._resid: dict[int, Tensor] = {}

    def _fold(self, g: Tensor) -> Tensor:
        """[steps * b, ...] -> [b, ...] weighted sum over steps, in float32."""
        steps = self.weights.shape[0]
        g = g.float().reshape(steps, g.shape[0] // steps, *g.shape[1:])
        w = self.weights.to(g.device, torch.float32).reshape(steps, *([1] * (g.dim() - 1)))
        return (w * g).sum(0)

    def _on_grad(
        self, buffer: Tensor, index: int | slice, transform: Callable[[Tensor], Tensor] | None
    ) -> HookFn:
        """A forward hook returning a fresh view whose gradient (this branch only) lands in buffer[index]."""

        def hook(x: Tensor) -> Tensor:
            y = x.view_as(x)
            if y.requires_grad:

                def on_backward(g: Tensor) -> None:
                    g = transform(g) if transform else g
                    buffer[:, : g.shape[1], index] += self._fold(g)

                y.register_hook(on_backward)
            return y

        return hook

    def _save_resid(self, layer: int) -> HookFn:
        def hook(x: Tensor) -> None:
            self._resid[layer] = x.detach()

        return hook

    def _qkv_transform(self, layer: int, letter: str) -> Callable[[Tensor], Tensor]:
        def transform(g: Tensor) -> Tensor:
            return self.model.qkv_input_grads(layer, letter, self._resid[layer], g)  # type: ignore[arg-type]

        return transform

    def hooks(self) -> list[tuple[str, HookFn]]:
        model, graph = self.model, self.graph
        hooks: list[tuple[str, HookFn]] = []
        if self.dst_grads is not None:
            for layer in range(graph.spec.n_layers):
                hooks.append((model.attn_norm_in_hook(layer), self._save_resid(layer)))
                for letter in ("q", "k", "v"):
                    hooks.append(
                        (
                            model.qkv_out_hook(layer, letter),  # type: ignore[arg-type]
                            self._on_grad(
                                self.dst_grads,
                                graph.qkv_destinations(layer, letter),
                                self._qkv_transform(layer, letter),
                            ),
                        )
                    )
                hooks.append(
                    (
                        model.mlp_norm_in_hook(layer),
                        self._on_grad(self.dst_grads, graph.mlp_destination(layer), None),
                    )
                )
            hooks.append(
                (model.final_norm_in_hook, self._on_grad(self.dst_grads, graph.logits_destination, None))
            )
        if self.src_grads is not None:
            hooks.append((model.input_hook, self._on_grad(self.src_grads, 0, None)))
            for layer in range(graph.spec.n_layers):
                hooks.append(
                    (
                        model.attn_out_hook(layer),
                        self._on_grad(self.src_grads, group_of_head_layer(layer), None),
                    )
                )
                hooks.append(
                    (
                        model.mlp_out_hook(layer),
                        self._on_grad(self.src_grads, group_of_mlp_layer(layer), None),
                    )
                )
        return hooks


def edge_scores(delta: Tensor, dst_grads: Tensor, valid: Tensor) -> Tensor:
    """sum over batch, positions and d_model of delta[u] . grad[v] -> [n_sources, n_destinations].

    delta: [b, P, n_sources, d]; dst_grads: [b, P, n_destinations, d]. One matmul; invalid edges zeroed.
    """
    n_src, n_dst = delta.shape[2], dst_grads.shape[2]
    a = delta.permute(2, 0, 1, 3).reshape(n_src, -1)
    g = dst_grads.permute(2, 0, 1, 3).reshape(n_dst, -1)
    return (a @ g.T) * valid.to(a.device)


def node_scores(delta: Tensor, src_grads: Tensor, groups: Tensor) -> Tensor:
    """sum of delta[u] . grad at u's output -> [n_sources]; grads are per source group."""
    return torch.einsum("bpsd,bpsd->s", delta, src_grads[:, :, groups.to(src_grads.device)])
