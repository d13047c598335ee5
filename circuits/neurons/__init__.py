"""MLP neurons: integrated-gradients attribution (Knowledge Neurons, IRCAN) and reweighting."""

from circuits.neurons.ig import NeuronAttribution, NeuronIGOptions, last_activations, neuron_ig
from circuits.neurons.ircan import (
    ContextNeurons,
    activation_difference_neurons,
    context_neurons,
    random_neurons_like,
    reweight,
    select_neurons,
)

__all__ = [
    "ContextNeurons",
    "NeuronAttribution",
    "NeuronIGOptions",
    "activation_difference_neurons",
    "context_neurons",
    "last_activations",
    "neuron_ig",
    "random_neurons_like",
    "reweight",
    "select_neurons",
]
