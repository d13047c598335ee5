"""Prompt pairs of different token lengths (`PromptPairs.alignment`) against an independent brute force.

The definition checked: an ablated edge u->v carries, at each clean position, u's output in the corrupted
run (the corrupted prompt under its own mask) at the corresponding position: ends matched to ends, start
tokens to start tokens; a clean position with no counterpart keeps the clean run's value. The reference
below runs each prompt alone, unpadded, builds that correspondence itself and patches destinations with
`tests.brute_force`'s hooks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from circuits import Graph, PromptPairs, attribute, evaluate
from circuits.metrics import answer_logprob, logit_diff
from tests.brute_force import destination_grads, gradient_scores, metric, source_outputs

PAIRS = [  # corrupted longer, longer, shorter (tiny tokenizer: 14/18, 6/10, 14/7 tokens)
    (
        "When Mary and John went to the store, John gave a drink to",
        "When Mary and John went to the big store, Alice gave a drink to",
        " Mary",
        " John",
    ),
    ("Then Tom said hello to", "Then Anna and Bob said hi to", " Tom", " Anna"),
    (
        "When Alice and Bob went to the store, Bob gave a drink to",
        "Then Tom gave a drink to",
        " Alice",
        " Bob",
    ),
]


def unequal_pairs(model) -> PromptPairs:
    clean, corrupted, answers, distractors = zip(*PAIRS)
    pairs = PromptPairs.from_strings(model, clean, corrupted, answers, distractors)
    assert pairs.aligned and not torch.equal(pairs.lengths, pairs.corrupted_real_lengths)
    return pairs


def counterpart(p: int, clean_length: int, corrupted_length: int, start_tokens: int) -> int | None:
    """The corrupted position of clean position p, written out from the rule's words."""
    if p < start_tokens:
        return p if p < corrupted_length else None
    q = corrupted_length - (clean_length - p)  # as far from the end
    return q if q >= start_tokens else None


def one_pair(
    pairs: PromptPairs, i: int, read: int | None = None
) -> tuple[PromptPairs, torch.Tensor, torch.Tensor]:
    """Pair i's clean prompt alone (unpadded) as pairs whose logit difference the reference reads at
    position `read` (default: the last), and both prompts' ids."""
    clean_length, corrupted_length = int(pairs.lengths[i]), int(pairs.corrupted_real_lengths[i])
    clean = pairs.clean[i : i + 1, :clean_length]
    read = clean_length - 1 if read is None else read
    alone = PromptPairs(
        clean, clean, torch.tensor([read + 1]), pairs.answer[i : i + 1], pairs.distractor[i : i + 1]
    )
    return alone, clean, pairs.corrupted[i : i + 1, :corrupted_length]


def aligned_deltas(model, pairs: PromptPairs, i: int) -> dict[str, torch.Tensor]:
    """Per source: corrupted output at the counterpart - clean output, [1, L_clean, d] (0 where none)."""
    _, clean_ids, corrupted_ids = one_pair(pairs, i)
    clean, corrupted = source_outputs(model, clean_ids), source_outputs(model, corrupted_ids)
    length, other = clean_ids.shape[1], corrupted_ids.shape[1]
    deltas = {}
    for name, value in clean.items():
        delta = torch.zeros_like(value)
        for p in range(length):
            q = counterpart(p, length, other, pairs.start_tokens)
            if q is not None:
                delta[:, p] = corrupted[name][:, q] - value[:, p]
        deltas[name] = delta
    return deltas


def brute_exact(model, graph: Graph, pairs: PromptPairs, reads: list[int] | None = None) -> torch.Tensor:
    """Exact edge effects on the logit difference, read at `reads` (default: each prompt's last token)."""
    scores = torch.zeros(graph.valid.shape, dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(pairs)):
            alone, _, _ = one_pair(pairs, i, None if reads is None else reads[i])
            deltas = aligned_deltas(model, pairs, i)
            base = metric(model, alone)
            for name in graph.edge_names():
                src, dst = name.split("->")
                patched = metric(model, alone, {dst: deltas[src]})
                scores[graph.edge_index(name)] += float(patched - base) / len(pairs)
    return scores


def brute_eap(model, graph: Graph, pairs: PromptPairs) -> torch.Tensor:
    scores = torch.zeros(graph.valid.shape, dtype=torch.float64)
    for i in range(len(pairs)):
        alone, _, _ = one_pair(pairs, i)
        scores += gradient_scores(
            graph, aligned_deltas(model, pairs, i), destination_grads(model, graph, alone)
        )
    return scores / len(pairs)


@pytest.fixture(params=["llama", "gpt2"])
def model(request, llama, gpt2):
    """Tiny Llama (grouped-query attention, no start token) and GPT-2 (its own layout, a BOS start token)."""
    return {"llama": llama, "gpt2": gpt2}[request.param]


def test_the_alignment_matches_ends_and_start_tokens(llama):
    pairs = unequal_pairs(llama)
    with_start = dataclasses.replace(pairs, start_tokens=1)
    for p in (pairs, with_start):
        for i in range(len(p)):
            length, other = int(p.lengths[i]), int(p.corrupted_real_lengths[i])
            expected = [counterpart(j, length, other, p.start_tokens) for j in range(length)]
            got = p.alignment[i, :length].tolist()
            assert got == [-1 if q is None else q for q in expected]
            assert (p.alignment[i, length:] == -1).all()
    assert with_start.alignment[2, 0] == 0 and with_start.alignment[2, 1] == -1  # clean is the longer one


def test_exact_patching_of_unequal_pairs_matches_a_brute_force(model):
    pairs = unequal_pairs(model)
    graph = Graph.from_model(model)
    exact = attribute(model, graph, pairs, method="exact", quiet=True).edge_scores
    expected = brute_exact(model, graph, pairs)
    assert expected.abs().max() > 1e-3  # the patches move the metric
    torch.testing.assert_close(exact.double(), expected, atol=2e-5, rtol=1e-4)


def test_eap_on_unequal_pairs_is_the_linearisation_of_that_patching(model):
    pairs = unequal_pairs(model)
    graph = Graph.from_model(model)
    eap = attribute(model, graph, pairs, method="eap", quiet=True).edge_scores
    torch.testing.assert_close(eap.double(), brute_eap(model, graph, pairs), atol=2e-5, rtol=1e-4)


def test_circuit_evaluation_of_unequal_pairs_patches_the_same_values(model):
    """A circuit missing one edge scores M(clean) + that edge's exact effect; batches of mixed lengths."""
    pairs = unequal_pairs(model)
    graph = Graph.from_model(model)
    exact = brute_exact(model, graph, pairs)
    edge = int(exact.abs().argmax())
    circuit = Graph.from_model(model)
    circuit.in_graph[:] = circuit.valid
    circuit.in_graph.view(-1)[edge] = False
    result = evaluate(model, circuit, pairs, batch_size=2)
    assert result.circuit - result.full == pytest.approx(float(exact.view(-1)[edge]), abs=2e-5)


@pytest.mark.filterwarnings("ignore:IG completeness")  # two steps are meant to miss it
def test_ig_on_unequal_pairs_ends_where_patching_the_input_ends(model):
    """Completeness: the IG total equals M(clean) - M(input patched at the aligned positions)."""
    pairs = unequal_pairs(model)
    graph = Graph.from_model(model)
    result = attribute(
        model, graph, pairs, method="eap-ig-inputs", ig_steps=24, quadrature="gauss-legendre", quiet=True
    )
    assert result.completeness is not None and result.completeness.relative_error < 1e-3
    # clean-corrupted is IG with the two ends as its grid, here as on pairs of one length
    ends = attribute(
        model, graph, pairs, method="eap-ig-inputs", ig_steps=2, quadrature="trapezoid", quiet=True
    )
    cc = attribute(model, graph, pairs, method="clean-corrupted", quiet=True)
    torch.testing.assert_close(cc.edge_scores, ends.edge_scores, atol=1e-6, rtol=1e-5)


def test_the_corrupted_metric_is_read_where_the_corrupted_prompt_ends(model):
    pairs = unequal_pairs(model)
    graph = Graph.from_model(model)
    result = attribute(model, graph, pairs, method="eap", quiet=True)
    expected = 0.0
    with torch.no_grad():
        for i in range(len(pairs)):
            _, _, corrupted_ids = one_pair(pairs, i)
            logits = model(corrupted_ids)[0, -1]
            expected += float(logits[pairs.answer[i]] - logits[pairs.distractor[i]]) / len(pairs)
    assert result.metric_corrupted == pytest.approx(expected, abs=1e-5)


# answers of several tokens (tiny tokenizer: ' Buenos Aires' 10 tokens, ' Paris' 6), unequal lengths
MULTI = [
    ("The capital of Argentina is", "The capital of France, in Europe, is", " Buenos Aires", " Paris"),
    ("Then Tom flew to", "Then Anna flew to", " New York", " New Delhi"),
    ("When Mary and John went to the store, John gave a drink to", "Then Alice gave it to", " Mary", " John"),
]


def test_answers_of_several_tokens_are_read_where_they_branch_and_scored_whole(model):
    """The prompts end with the answer but its last token; logit_diff compares answer and distractor at
    their first differing token, answer_logprob sums the log-probabilities of the answer's tokens. Both
    recomputed here from the texts, token by token."""
    clean, corrupted, answers, distractors = zip(*MULTI)
    pairs = PromptPairs.from_strings(model, clean, corrupted, answers, distractors)
    tokens = model.tokenizer
    with torch.no_grad():
        for i, (prompt, _, answer, distractor) in enumerate(MULTI):
            a = tokens(answer, add_special_tokens=False)["input_ids"]
            d = tokens(distractor, add_special_tokens=False)["input_ids"]
            k = next(j for j, (x, y) in enumerate(zip(a, d)) if x != y)
            ids = model.to_ids([prompt])[0]
            assert pairs.clean[i, : int(pairs.lengths[i])].tolist() == ids + a[:-1]
            assert int(pairs.read_positions[i]) == len(ids) - 1 + k
            logp = model(torch.tensor([ids + a])).log_softmax(-1)[0]
            expected = sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(a))
            got = float(answer_logprob(model(pairs.clean[i : i + 1]), pairs[i : i + 1]))
            assert got == pytest.approx(expected, abs=1e-4)
            branch = model(torch.tensor([ids + a[:k]]))[0, -1]
            got = float(logit_diff(model(pairs.clean[i : i + 1]), pairs[i : i + 1]))
            assert got == pytest.approx(float(branch[a[k]] - branch[d[k]]), abs=1e-4)


def test_exact_patching_with_answers_of_several_tokens_matches_a_brute_force(model):
    clean, corrupted, answers, distractors = zip(*MULTI)
    pairs = PromptPairs.from_strings(model, clean, corrupted, answers, distractors)
    assert pairs.aligned and pairs.answer_tokens is not None
    reads = []  # the branch positions, from the texts
    for prompt, _, answer, distractor in MULTI:
        a, d = (model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (answer, distractor))
        k = next(j for j, (x, y) in enumerate(zip(a, d)) if x != y)
        reads.append(len(model.to_ids([prompt])[0]) - 1 + k)
    graph = Graph.from_model(model)
    exact = attribute(model, graph, pairs, method="exact", quiet=True).edge_scores
    torch.testing.assert_close(exact.double(), brute_exact(model, graph, pairs, reads), atol=2e-5, rtol=1e-4)
    attribute(model, graph, pairs, metric="answer_logprob", method="eap", quiet=True)  # whole answers


def test_follow_up_analysis_sees_the_attributed_tokens(model):
    """`to_tokens` makes the ids the pairs hold (start token included or not, as attributed) and
    `run_with_cache` runs them with the pairs' mask."""
    pairs = unequal_pairs(model)
    ids, mask = model.to_tokens([c for c, _, _, _ in PAIRS])
    assert torch.equal(ids[mask.bool()], pairs.clean[pairs.attention_mask.bool()])
    assert torch.equal(mask, pairs.attention_mask[:, : mask.shape[1]])
    name = model.mlp_out_hook(0)
    logits, cache = model.run_with_cache(pairs.clean, pairs.attention_mask, [name])
    with torch.no_grad(), model.capture([name]) as captured:
        expected = model(pairs.clean, pairs.attention_mask)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(cache[name], captured[name])
    _, everything = model.run_with_cache(pairs.clean[:1])
    assert name in everything and len(everything) > 10


def test_span_scores_of_prompts_of_different_lengths(model):
    """A SpanGraph on pairs of different lengths: spans of different lengths line up by span; EAP's span
    scores sum to its position-summed ones, and exact patching of a span edge patches the aligned
    corrupted values at that span's positions only (the brute force above, masked)."""
    from circuits import SpanGraph, attribute
    from circuits.spans import Spans

    pairs = unequal_pairs(model)
    index = torch.full(pairs.clean.shape, -1, dtype=torch.long)
    for i, length in enumerate(pairs.lengths.tolist()):  # the first half, the rest, the last token
        index[i, : length // 2] = 0
        index[i, length // 2 : length - 1] = 1
        index[i, length - 1] = 2
    spans = Spans(("head", "tail", "end"), index)
    split = attribute(model, SpanGraph.from_model(model, spans), pairs, method="eap", spans=spans, quiet=True)
    plain = attribute(model, Graph.from_model(model), pairs, method="eap", quiet=True)
    scale = float(plain.edge_scores.abs().max())
    torch.testing.assert_close(split.span_edge_scores.sum(0), plain.edge_scores, atol=1e-6 * scale, rtol=0)
    exact = attribute(
        model, SpanGraph.from_model(model, spans), pairs, method="exact", spans=spans, quiet=True
    )
    graph = Graph.from_model(model)
    for s in range(3):
        expected = torch.zeros(graph.valid.shape, dtype=torch.float64)
        with torch.no_grad():
            for i in range(len(pairs)):
                alone, _, _ = one_pair(pairs, i)
                keep = (index[i, : int(pairs.lengths[i])] == s)[None, :, None].to(model.dtype)
                deltas = {k: v * keep for k, v in aligned_deltas(model, pairs, i).items()}
                base = metric(model, alone)
                for name in graph.edge_names():
                    src, dst = name.split("->")
                    expected[graph.edge_index(name)] += float(metric(model, alone, {dst: deltas[src]}) - base)
        expected /= len(pairs)
        top = float(exact.span_edge_scores.abs().max())
        torch.testing.assert_close(exact.span_edge_scores[s].double(), expected, atol=1e-4 * top, rtol=0)
