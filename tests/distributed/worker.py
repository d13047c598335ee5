"""Run by `tests/distributed/test_data_parallel.py`, alone or under torchrun: the data-parallel entry
points on a tiny model; the process that writes (rank 0) saves the results to the file given."""

from __future__ import annotations

import sys

import torch

from circuits import Graph, attribute
from circuits.distributed import is_main, world_size
from circuits.evaluation import evaluate_many
from circuits.neurons import neuron_ig
from circuits.steering import contrastive_token_ig
from circuits.testing import tiny_llama
from tests.pairs import PAIRS, make_pairs


def results() -> dict[str, torch.Tensor]:
    model = tiny_llama()
    pairs = make_pairs(model).repeat(3)[:7]  # 7 pairs: unequal shards over 2 processes, ragged batches
    found: dict[str, torch.Tensor] = {"world_size": torch.tensor(world_size())}
    for method in ("eap", "eap-ig-inputs"):
        graph = Graph.from_model(model)
        result = attribute(model, graph, pairs, method=method, batch_size=3, quiet=True)
        assert result.edge_scores is not None and result.node_scores is not None
        found[f"{method}/edges"], found[f"{method}/nodes"] = result.edge_scores, result.node_scores
        if result.completeness is not None:
            found[f"{method}/completeness"] = torch.tensor(result.completeness.abs_error, dtype=torch.float64)
    circuits = [graph.top_n(n) for n in (5, 20, 60)]  # from the eap-ig-inputs scores
    evaluations = evaluate_many(model, circuits, pairs, batch_size=3)
    found["evaluate/per_example"] = torch.stack([e.per_example for e in evaluations])
    found["evaluate/full_empty"] = torch.tensor(
        [evaluations[0].full, evaluations[0].empty], dtype=torch.float64
    )
    prompts = [clean for clean, *_ in PAIRS] + [
        "Then Anna said hello to",
        "When Tom and Anna went to the store",
    ]
    targets = [answer for _, _, answer, _ in PAIRS] + [" Tom", " Anna"]
    # one prompt per pass: the same float operations per prompt whatever the sharding (prob_delta is a
    # difference of probabilities, so fp32 noise from other padding would be large relative to it)
    neurons = neuron_ig(model, prompts, targets, steps=4, prompts_per_pass=1, quiet=True)
    found["neuron_ig/scores"], found["neuron_ig/prob_delta"] = neurons.scores, neurons.prob_delta
    for rule in ("gauss-legendre", "idgi"):  # the IG steps are shared; IDGI gathers them in step order
        tokens = contrastive_token_ig(
            model, PAIRS[0][0], " Mary", " John", steps=7, quadrature=rule, max_rows=2
        )
        found[f"token_ig/{rule}"] = tokens.scores
    return found


if __name__ == "__main__":
    out = results()
    if is_main():
        torch.save(out, sys.argv[1])
