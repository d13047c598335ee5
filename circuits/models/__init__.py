"""Loading Hugging Face causal LMs as hooked models."""

from circuits.models.checks import AdditivityError, check_additivity, check_bridge, check_heads_independent
from circuits.models.embedded import EMBEDDED_NAME, EmbeddedModelMissing
from circuits.models.hooked import HookedModel, ModelSpec
from circuits.models.loading import load_model

__all__ = [
    "EMBEDDED_NAME",
    "AdditivityError",
    "EmbeddedModelMissing",
    "HookedModel",
    "ModelSpec",
    "check_additivity",
    "check_bridge",
    "check_heads_independent",
    "load_model",
]
