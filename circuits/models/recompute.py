"""Activation checkpointing of a hooked model's blocks (Chen et al. 2016, arXiv 1604.06174).

Within `recomputed_blocks(model)`, a block run with gradients keeps only its inputs for the backward pass;
when the backward pass reaches the block, it runs the block again and differentiates that run. A backward
pass then holds one block's activations instead of every block's: for long prompts, mostly the attention
probabilities, `n_heads x P x P` floats per row and layer.

The second run must compute what the first computed, with the same hooks, although the backward pass
usually runs after the `HookedModel.hooks` block that added them has ended. Each block's first run
therefore snapshots the forward hooks of its modules, and its second run swaps that snapshot in. Hooks
whose effect is a write (the source-output buffers) check `model.recomputing` and skip the second write;
hooks that replace an activation run again and return the same value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformer_lens.hook_points import HookPoint

from circuits.models.hooked import HookedModel

HookTable = list[tuple[nn.Module, dict[int, Callable[..., Any]], list[Any]]]


def _snapshot(block: nn.Module) -> HookTable:
    """The forward hooks of every module inside `block` as they are now: torch's, and for hook points
    TransformerLens' own list of them (some blocks ask it whether a hook point is hooked)."""
    return [
        (module, dict(module._forward_hooks), list(getattr(module, "fwd_hooks", [])))
        for module in block.modules()
    ]


def _install(table: HookTable) -> None:
    for module, hooks, lens_hooks in table:
        module._forward_hooks.clear()
        module._forward_hooks.update(hooks)
        if isinstance(module, HookPoint):
            module.fwd_hooks[:] = lens_hooks


@contextmanager
def _replayed(
    model: HookedModel, block: nn.Module, table: HookTable, shape: tuple[int, ...] | None
) -> Iterator[None]:
    """Run with the forward hooks of `table` in place of the current ones, `model.recomputing` set."""
    current = _snapshot(block)
    _install(table)
    batch_shape, model._batch_shape, model.recomputing = model._batch_shape, shape, True
    try:
        yield
    finally:
        model._batch_shape, model.recomputing = batch_shape, False
        _install(current)


def _checkpointed(model: HookedModel, block: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or model.recomputing:
            return forward(*args, **kwargs)
        table, shape = _snapshot(block), model._batch_shape

        def contexts() -> tuple[Any, Any]:
            return _nothing(), _replayed(model, block, table, shape)

        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return run


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def recomputed_blocks(model: HookedModel) -> Iterator[None]:
    """Within the block, every transformer block of `model` is checkpointed (see the module docstring);
    results are unchanged, a backward pass keeps one block's activations at a time and costs one more
    forward pass."""
    blocks = list(model.bridge.blocks)
    for block in blocks:  # the instance attribute shadows the class's forward (nn.Module.__call__ reads it)
        object.__setattr__(block, "forward", _checkpointed(model, block, block.forward))
    try:
        yield
    finally:
        for block in blocks:
            object.__delattr__(block, "forward")
