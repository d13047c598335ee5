"""IRCAN (Shi et al., NeurIPS 2024): context-aware neurons and their reweighting.

Attribution: neuron IG with the activations of the prompt without its context as the baseline and the
prompt with the context as the input, for the probability of the first token of the answer the context
supports. Selection: per example keep the neurons scoring at least `threshold` x the example's maximum,
at most `per_example` of them; count how often each neuron is kept over the fit set; the `h` most frequent
neurons (ties: higher summed score) are the context neurons. Reweighting multiplies their activations by
beta at every position, reversibly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from circuits.errors import InputError
from circuits.models.hooked import HookedModel, uses_model
from circuits.neurons.ig import NeuronAttribution, last_activations, neuron_ig


@dataclass
class ContextNeurons:
    """Neurons ranked by how often they were kept over the fit examples."""

    neurons: Tensor  # [k, 2] (layer, neuron index), most frequent first
    counts: Tensor  # [k] examples that kept each neuron
    attribution: NeuronAttribution

    def top(self, h: int) -> Tensor:
        """[h, 2] the h most frequent neurons."""
        if not 1 <= h <= len(self.neurons):
            raise InputError(f"h must lie in [1, {len(self.neurons)}], got {h}")
        return self.neurons[:h]


def select_neurons(scores: Tensor, threshold: float = 0.1, per_example: int = 20) -> tuple[Tensor, Tensor]:
    """Frequency ranking of neurons over examples.

    Args:
        scores: [n_examples, n_layers, d_mlp].
    Returns:
        neurons [k, 2] (layer, index) kept by at least one example, most frequent first, and counts [k].
    """
    n, d_mlp = scores.shape[0], scores.shape[2]
    flat = scores.reshape(n, -1)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    for i in range(n):
        top = flat[i].topk(min(per_example, flat.shape[1]))
        mask = top.values >= threshold * flat[i].max()
        mask &= top.values > 0
        kept[i, top.indices[mask]] = True
    counts = kept.sum(0)
    total = (flat * kept).sum(0)
    order = sorted(counts.nonzero()[:, 0].tolist(), key=lambda j: (-int(counts[j]), -float(total[j])))
    index = torch.tensor(order, dtype=torch.long)
    neurons = torch.stack([index // d_mlp, index % d_mlp], dim=1)
    return neurons, counts[index]


@uses_model
def context_neurons(
    model: HookedModel,
    with_context: Sequence[str],
    without_context: Sequence[str],
    targets: Sequence[str | int],
    *,
    steps: int = 20,
    threshold: float = 0.1,
    per_example: int = 20,
    quiet: bool = False,
    **ig_options: Any,
) -> ContextNeurons:
    """IRCAN's context-aware neurons of a fit set (prompts with and without their context, targets)."""
    if not with_context:
        raise InputError("the fit set is empty")
    if len(with_context) != len(without_context):
        raise InputError(f"{len(with_context)} prompts with context but {len(without_context)} without")
    baseline = last_activations(model, without_context)
    result = neuron_ig(
        model, with_context, targets, baseline=baseline, steps=steps, quiet=quiet, **ig_options
    )
    neurons, counts = select_neurons(result.scores, threshold, per_example)
    return ContextNeurons(neurons, counts, result)


def random_neurons_like(neurons: Tensor, d_mlp: int, seed: int = 0) -> Tensor:
    """[k, 2] random neurons with the same number per layer as `neurons` (the control)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in neurons[:, 0].unique().tolist():
        count = int((neurons[:, 0] == layer).sum())
        chosen = torch.randperm(d_mlp, generator=gen)[:count]
        out.append(torch.stack([torch.full_like(chosen, layer), chosen], dim=1))
    return torch.cat(out) if out else neurons.clone()


@uses_model
def activation_difference_neurons(
    model: HookedModel, with_context: Sequence[str], without_context: Sequence[str], h: int
) -> Tensor:
    """[h, 2] (layer, index) of the h neurons whose activation at the last position rises most, on
    average over the examples, from the prompt without its context to the prompt with it: IRCAN's
    gradient-free control (the same examples, no attribution)."""
    if len(with_context) != len(without_context) or not with_context:
        raise InputError(
            f"need as many prompts with context as without (at least one), got {len(with_context)} and "
            f"{len(without_context)}"
        )
    rise = (last_activations(model, with_context) - last_activations(model, without_context)).mean(0)
    if not 1 <= h <= rise.numel():
        raise InputError(f"h must lie in [1, {rise.numel()}], got {h}")
    index = rise.flatten().topk(h).indices
    d_mlp = rise.shape[1]
    return torch.stack([index // d_mlp, index % d_mlp], dim=1)


@contextmanager
def reweight(model: HookedModel, neurons: Tensor, beta: float) -> Iterator[None]:
    """Within the block, the activations of `neurons` ([k, 2] (layer, index)) are multiplied by `beta` at
    every position (beta = 0 erases them); the model is untouched on exit."""
    if neurons.dim() != 2 or neurons.shape[1] != 2:
        raise InputError(f"neurons must be [k, 2] (layer, index), got {tuple(neurons.shape)}")
    spec = model.spec
    if len(neurons) and (
        int(neurons[:, 0].max()) >= spec.n_layers
        or int(neurons[:, 1].max()) >= spec.d_mlp
        or int(neurons.min()) < 0
    ):
        raise InputError(f"neurons must index layers < {spec.n_layers} and neurons < {spec.d_mlp}")
    hooks = []
    for layer in neurons[:, 0].unique().tolist():
        index = neurons[neurons[:, 0] == layer, 1]

        def scale(x: Tensor, index: Tensor = index) -> Tensor:
            x = x.clone()
            x[..., index.to(x.device)] *= beta
            return x

        hooks.append((model.mlp_post_hook(layer), scale))
    with model.hooks(hooks):
        yield
