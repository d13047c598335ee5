"""Context-versus-memory data sets used by IRCAN: MemoTrap and COSE_KRE.

Each example has a prompt with its context and without it, answer options as continuations, the option
the context supports and the option memory would give. `context_accuracy` scores every option by the sum
of its tokens' log-probabilities after the prompt with context and reports accuracy (the context-supported
option wins) and stubbornness (the memorised option wins).

- MemoTrap: the context is the instruction ('Write a quote that ends in the word "kings": '); without it
  only the quote's start remains. Options are the two endings; the instruction-following one is correct.
- COSE_KRE: a CommonsenseQA question with a `negative_context` that argues for another option; options are
  the letters A-E after a listing of the choices; the context-supported option is `candidate`, the
  memorised one `answer`.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from circuits.errors import InputError
from circuits.models.hooked import HookedModel

from .scoring import continuation_logprobs

LETTERS = "ABCDEFGH"


@dataclass
class ContextExample:
    with_context: str
    without_context: str
    options: list[str]  # continuations, leading space included
    context_answer: int  # index of the option the context supports
    memory_answer: int | None  # index of the option memory supports


def _read_json_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def memotrap(path: str | Path) -> list[ContextExample]:
    """MemoTrap rows (`prompt`, `classes` as a Python list string, `answer_index`)."""
    examples = []
    for i, row in enumerate(_read_json_rows(Path(path))):
        prompt, answer = row["prompt"], int(row["answer_index"])
        if ": " not in prompt:
            raise InputError(f"{path}: row {i + 1}: no instruction ending in ': ' in {prompt!r}")
        options = list(ast.literal_eval(row["classes"]))
        quote = prompt.split(": ", 1)[1]
        examples.append(
            ContextExample(prompt, quote, options, answer, 1 - answer if len(options) == 2 else None)
        )
    return examples


def cose_kre(path: str | Path) -> list[ContextExample]:
    """COSE_KRE rows (`question`, `choices`, `answer` and `candidate` letters, `negative_context`)."""
    examples = []
    for row in _read_json_rows(Path(path)):
        listing = "\n".join(f"{LETTERS[j]}. {choice}" for j, choice in enumerate(row["choices"]))
        question = f"Question: {row['question']}\n{listing}\nAnswer:"
        options = [f" {LETTERS[j]}" for j in range(len(row["choices"]))]
        examples.append(
            ContextExample(
                f"Context: {row['negative_context']}\n{question}",
                question,
                options,
                LETTERS.index(row["candidate"]),
                LETTERS.index(row["answer"]),
            )
        )
    return examples


@dataclass
class ContextScores:
    accuracy: float  # context-supported option chosen
    stubbornness: float  # memorised option chosen
    n: int
    per_example: torch.Tensor | None = None  # [n, 2] each example's (context option, memorised option) chosen

    def __str__(self) -> str:
        return f"accuracy {self.accuracy:.1%}, stubbornness {self.stubbornness:.1%} (n={self.n})"


def context_accuracy(model: HookedModel, examples: list[ContextExample]) -> ContextScores:
    """Accuracy and stubbornness rate of the model on prompts with their context."""
    if not examples:
        raise InputError("no examples to evaluate")
    each = []
    for e in examples:
        choice = int(continuation_logprobs(model, e.with_context, e.options).argmax())
        each.append([float(choice == e.context_answer), float(choice == e.memory_answer)])
    table = torch.tensor(each, dtype=torch.float64)
    accuracy, stubbornness = table.mean(0).tolist()
    return ContextScores(accuracy, stubbornness, len(examples), table)


def first_token(model: HookedModel, example: ContextExample) -> int:
    """Id of the first token of the context-supported option (IRCAN's attribution target)."""
    return int(
        model.tokenizer(example.options[example.context_answer], add_special_tokens=False)["input_ids"][0]
    )
