"""GrAInS steering: token attributions, steering vectors from the top tokens, norm-preserving steering."""

from circuits.steering.token_ig import (
    TokenAttribution,
    TokenIGOptions,
    contrastive_token_ig,
    gradient_x_input,
    token_embeddings,
    token_ig,
)
from circuits.steering.vectors import SteeringVectors, generate, pc1_aligned, steer, steering_vectors

__all__ = [
    "SteeringVectors",
    "TokenAttribution",
    "TokenIGOptions",
    "contrastive_token_ig",
    "generate",
    "gradient_x_input",
    "pc1_aligned",
    "steer",
    "steering_vectors",
    "token_embeddings",
    "token_ig",
]
