"""Scoring continuations of a prompt by their log-probability under the model (multiple-choice tasks)."""

from __future__ import annotations

import torch
from torch import Tensor

from circuits.errors import InputError
from circuits.models.hooked import HookedModel, uses_model


@uses_model
def continuation_logprobs(model: HookedModel, prompt: str, continuations: list[str]) -> Tensor:
    """[n_continuations] sum of log-probabilities of each continuation's tokens after `prompt` (one batch)."""
    prompt_ids = model.to_ids([prompt])[0]
    option_ids = [model.tokenizer(o, add_special_tokens=False)["input_ids"] for o in continuations]
    empty = [i for i, o in enumerate(option_ids) if not o]
    if empty:
        raise InputError(f"continuation {empty[0]} ({continuations[empty[0]]!r}) has no tokens")
    rows = [prompt_ids + o for o in option_ids]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=model.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
    with torch.no_grad():
        logp = model(ids, mask).float().log_softmax(-1)
    totals = []
    for i, o in enumerate(option_ids):
        positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(o))
        totals.append(logp[i, positions, torch.tensor(o)].sum())
    return torch.stack(totals).cpu()
