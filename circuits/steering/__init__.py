"""GrAInS steering: token attributions, steering vectors from the top tokens, norm-preserving steering."""

from circuits.steering.token_ig import TokenAttribution, contrastive_token_ig, token_embeddings, token_ig
from circuits.steering.vectors import SteeringVectors, generate, pc1_aligned, steer, steering_vectors

__all__ = [
    "SteeringVectors",
    "TokenAttribution",
    "contrastive_token_ig",
    "generate",
    "pc1_aligned",
    "steer",
    "steering_vectors",
    "token_embeddings",
    "token_ig",
]
