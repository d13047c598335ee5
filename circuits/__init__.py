"""circuits: find the circuit inside a transformer language model, and steer it at inference time.

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

from circuits.attribution import Attribution, attribute, head_patching
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
from circuits.evaluation import Evaluation, evaluate
from circuits.graph import Graph
from circuits.models import HookedModel, load_model

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
    "UnsupportedModelError",
    "attribute",
    "evaluate",
    "head_patching",
    "load_model",
]
__version__ = "0.1.0"
