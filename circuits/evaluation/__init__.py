"""How good a circuit is.

patched      evaluate / evaluate_many: the model with every edge outside a circuit ablated
curves       faithfulness curves over budgets, MIB's CPR and CMD
intervals    bootstrap intervals, circuit stability, sign-consistency filtering
refinement   circuits improved by gradient-guided edge swaps
submissions  MIB submission folders
"""

from circuits.evaluation.patched import Evaluation, ablated_outputs, evaluate, evaluate_many

__all__ = ["Evaluation", "ablated_outputs", "evaluate", "evaluate_many"]
