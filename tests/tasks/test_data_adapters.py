"""MemoTrap / COSE_KRE / TruthfulQA adapters and continuation scoring, on small files in their formats."""

import csv
import json

import pytest
import torch
from circuits_tasks.context import context_accuracy, cose_kre, first_token, memotrap
from circuits_tasks.paths import DEFAULT
from circuits_tasks.scoring import continuation_logprobs
from circuits_tasks.truthfulqa import load_truthfulqa, multiple_choice, split_questions

SHARED = DEFAULT


def test_continuation_logprobs_match_one_sequence_at_a_time(llama):
    prompt, options = "Then Tom said hello to", [" Tom", " Anna said hello to the store"]
    batched = continuation_logprobs(llama, prompt, options)
    for i, option in enumerate(options):
        ids = llama.to_ids([prompt + option])[0]
        n_prompt = len(llama.to_ids([prompt])[0])
        with torch.no_grad():
            logp = llama(torch.tensor([ids]))[0].log_softmax(-1)
        expected = sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
        assert float(batched[i]) == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="no tokens"):
        continuation_logprobs(llama, prompt, [""])


def test_memotrap_and_cose_formats(llama, tmp_path):
    row = {
        "prompt": 'Write a quote that ends in the word "Mary": Then Tom said hello to',
        "classes": "[' Tom', ' Mary']",
        "answer_index": 1,
    }
    (tmp_path / "memo.jsonl").write_text(json.dumps(row) + "\n")
    (example,) = memotrap(tmp_path / "memo.jsonl")
    assert example.without_context == "Then Tom said hello to"
    assert (example.context_answer, example.memory_answer) == (1, 0)
    assert first_token(llama, example) == llama.single_token_id(" Mary")
    cose = [
        {
            "question": "Who went?",
            "choices": ["Mary", "John", "Tom"],
            "answer": "A",
            "candidate": "C",
            "negative_context": "Tom went.",
        }
    ]
    (tmp_path / "cose.json").write_text(json.dumps(cose))
    (q,) = cose_kre(tmp_path / "cose.json")
    assert q.with_context.startswith("Context: Tom went.") and not q.without_context.startswith("Context")
    assert q.options == [" A", " B", " C"] and (q.context_answer, q.memory_answer) == (2, 0)
    scores = context_accuracy(llama, [example, q])
    assert scores.n == 2 and 0 <= scores.accuracy + scores.stubbornness <= 1


def test_truthfulqa_split_and_scores(llama, tmp_path):
    path = tmp_path / "tqa.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]
        )
        for name in ["Mary", "John", "Tom", "Anna", "Bob"]:
            writer.writerow(
                ["", "", f"Who said hello to {name}?", name, f"{name}; It was {name}", "Alice; Bob", ""]
            )
    questions = load_truthfulqa(path)
    fit, dev, test = split_questions(questions, 2, 1, seed=1)
    assert (len(fit), len(dev), len(test)) == (2, 1, 2)
    assert len({q.question for q in fit + dev + test}) == 5  # disjoint
    assert [q.question for q in split_questions(questions, 2, 1, seed=1)[0]] == [q.question for q in fit]
    scores = multiple_choice(llama, test)
    by_hand_mc1 = by_hand_mc2 = 0.0
    for q in test:
        logp = continuation_logprobs(llama, q.prompt, [" " + a for a in [q.best, *q.correct, *q.incorrect]])
        by_hand_mc1 += float(logp[0] > logp[1 + len(q.correct) :].max())
        p = logp[1:].double().exp()
        by_hand_mc2 += float(p[: len(q.correct)].sum() / p.sum())
    assert scores.mc1 == pytest.approx(by_hand_mc1 / 2) and scores.mc2 == pytest.approx(by_hand_mc2 / 2)
    with pytest.raises(ValueError, match="no test questions"):
        split_questions(questions, 4, 1)


@pytest.mark.skipif(not SHARED.exists(), reason="the shared data folder is not next to this checkout")
def test_shared_files_parse():
    assert len(memotrap(SHARED / "ircan/data/MemoTrap/memo-trap_classification_test.jsonl")) == 469
    assert len(cose_kre(SHARED / "ircan/data/KRE/COSE/cose_dev.json")) == 610
    assert len(load_truthfulqa(SHARED / "truthfulqa/TruthfulQA.csv")) == 813
