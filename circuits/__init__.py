"""circuits: find the circuit inside a transformer language model, and steer it at inference time."""

from circuits.attribution import Attribution, attribute
from circuits.data import PromptPairs
from circuits.evaluation import Evaluation, evaluate
from circuits.graph import Graph
from circuits.models import HookedModel, load_model

__all__ = [
    "Attribution",
    "Evaluation",
    "Graph",
    "HookedModel",
    "PromptPairs",
    "attribute",
    "evaluate",
    "load_model",
]
__version__ = "0.1.0"
