"""Ready-made circuit tasks as seeded generators of prompt pairs."""

from tasks.baseline import Baseline, baseline
from tasks.ioi import IOIPairs, ioi_pairs

__all__ = ["Baseline", "IOIPairs", "baseline", "ioi_pairs"]
