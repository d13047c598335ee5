"""circuits: find the circuit inside a transformer language model, and steer it at inference time."""

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
