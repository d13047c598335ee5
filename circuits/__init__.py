"""circuits: find the circuit inside a transformer language model, and steer it at inference time."""

from circuits.graph import Graph
from circuits.models import HookedModel, load_model

__all__ = ["Graph", "HookedModel", "load_model"]
__version__ = "0.1.0"
