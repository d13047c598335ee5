"""Ready-made circuit tasks as seeded generators of prompt pairs, loaders for user files, and baselines."""

from circuits.baseline import Baseline, baseline
from circuits.task import TaskPairs

from .agreement import agreement_pairs
from .capitals import capital_pairs
from .common import Example
from .files import load_pairs
from .greater_than import GreaterThanMetric, greater_than_pairs
from .induction import induction_pairs
from .ioi import ioi_pairs

TASKS = {
    "ioi": ioi_pairs,
    "agreement": agreement_pairs,
    "capitals": capital_pairs,
    "greater_than": greater_than_pairs,
    "induction": induction_pairs,
}

__all__ = [
    "TASKS",
    "Baseline",
    "Example",
    "GreaterThanMetric",
    "TaskPairs",
    "agreement_pairs",
    "baseline",
    "capital_pairs",
    "greater_than_pairs",
    "induction_pairs",
    "ioi_pairs",
    "load_pairs",
]
