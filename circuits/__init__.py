"""circuits: find the circuit inside a transformer language model, and steer it at inference time.

Everything a notebook needs is importable from here (`from circuits import load_model, attribute, ...`);
the parts that bring in plotting, the page, neurons and steering are imported on first use, so that
`import circuits.cli` loads only what a command needs.

Axis letters in docstrings and shape comments, everywhere in the package:
    N  pairs / prompts of a data set        b  examples of one batch
    B  rows of one forward pass (K * b when steps are stacked)
    P  token positions                      K  integration steps (IG)
    n  heads of a block (n_heads for q, n_kv_heads for k and v)
    L  layers                               J  layers attributed (neuron IG)
    d_head, d_model, d_mlp, d_vocab         written out
Edge tensors are [n_sources, n_destinations]; source outputs [B, P, n_sources, d_model]. The design,
the graph and each method's math are in docs/design.md.
"""

from importlib import import_module
from typing import Any

from circuits.attribution import Attribution, ScoringOptions, attribute, head_patching
from circuits.baseline import baseline  # eager: the name is also a submodule's, which would shadow it
from circuits.data import PromptPairs
from circuits.errors import (
    CircuitsError,
    CircuitsWarning,
    FileFormatError,
    GraphMismatchError,
    InputError,
    ModelLoadError,
    NumericalError,
    UnsupportedModelError,
)
from circuits.evaluation import Evaluation, evaluate, evaluate_many
from circuits.graph import Graph
from circuits.models import HookedModel, load_model

_LAZY = {  # name -> the module that defines it, imported on first use
    "make_task": "circuits.task",
    "TaskPairs": "circuits.task",
    "select": "circuits.selection.strategies",
    "SpanGraph": "circuits.span_graph",
    "Spans": "circuits.spans",
    "CurveOptions": "circuits.evaluation.curves",
    "faithfulness_curve": "circuits.evaluation.curves",
    "mib_scores": "circuits.evaluation.curves",
    "bootstrap_scores": "circuits.evaluation.intervals",
    "circuit_stability": "circuits.evaluation.intervals",
    "RefineOptions": "circuits.evaluation.refinement",
    "refine": "circuits.evaluation.refinement",
    "draw_circuit": "circuits.pictures.drawing",
    "plot_curves": "circuits.pictures.drawing",
    "draw_span_circuit": "circuits.pictures.span_drawing",
    "show": "circuits.pictures.viewer",
    "write_page": "circuits.pictures.viewer",
    "DiscoveryOptions": "circuits.pipeline",
    "discover": "circuits.pipeline",
    "top_heads": "circuits.pipeline",
    "NeuronIGOptions": "circuits.neurons",
    "neuron_ig": "circuits.neurons",
    "last_activations": "circuits.neurons",
    "context_neurons": "circuits.neurons",
    "random_neurons_like": "circuits.neurons",
    "reweight": "circuits.neurons",
    "token_ig": "circuits.steering",
    "contrastive_token_ig": "circuits.steering",
    "steering_vectors": "circuits.steering",
    "steer": "circuits.steering",
    "generate": "circuits.steering",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'circuits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Attribution",
    "CircuitsError",
    "CircuitsWarning",
    "Evaluation",
    "FileFormatError",
    "Graph",
    "GraphMismatchError",
    "HookedModel",
    "InputError",
    "ModelLoadError",
    "NumericalError",
    "PromptPairs",
    "ScoringOptions",
    "UnsupportedModelError",
    "attribute",
    "baseline",
    "evaluate",
    "evaluate_many",
    "head_patching",
    "load_model",
    *_LAZY,
]
__version__ = "0.1.0"
