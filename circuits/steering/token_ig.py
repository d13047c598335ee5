"""Integrated gradients over input tokens (GrAInS' attribution; "layer integrated gradients" on embeddings).

For a prompt with token embeddings e (BOS, when present, is left as it is) and a baseline b (zero by
default), the embeddings are moved along b + alpha (e - b) and
    score_t = sum_d (e - b)_{t,d} * sum_k w_k df/de_{t,d}(alpha_k),
so that sum_t score_t ~ f(e) - f(b) (completeness, returned). The function f is either
- the log-probability of a continuation: sum over its tokens of log p(token | everything before it), with
  the continuation appended to the prompt (its embeddings are not interpolated), or
- the logit of a target token at the prompt's last position (the classifier form).
Steps run in the batch dimension, `max_rows` at a time. `contrastive_token_ig` is the IG of log p(preferred)
minus the IG of log p(dispreferred).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from circuits.data import check_count
from circuits.distributed import gather_rows, process_chunks, sum_tensor
from circuits.errors import InputError, NumericalError
from circuits.models.hooked import HookedModel, uses_model
from circuits.quadrature import Quadrature, check_steps, idgi, warn_if_incomplete
from circuits.quadrature import quadrature as quadrature_rule


@dataclass(frozen=True)
class TokenAttribution:
    tokens: list[str]  # the prompt's tokens, as text
    scores: Tensor  # [n_prompt_tokens] (0 for BOS)
    delta: float  # f(input) - f(baseline)

    @property
    def total(self) -> float:
        return float(self.scores.sum())

    @property
    def abs_error(self) -> float:
        """Completeness error |sum of scores - (f(input) - f(baseline))|."""
        return abs(self.total - self.delta)

    @property
    def relative_error(self) -> float:
        """`abs_error` / |f(input) - f(baseline)| (the names of `circuits.attribution.Completeness`)."""
        return self.abs_error / max(abs(self.delta), 1e-12)

    def __sub__(self, other: TokenAttribution) -> TokenAttribution:
        if self.tokens != other.tokens:
            raise InputError("attributions of different prompts cannot be subtracted")
        return TokenAttribution(self.tokens, self.scores - other.scores, self.delta - other.delta)

    def render(self) -> str:
        """The prompt with each token coloured by its score (terminal ANSI colours: green +, red -)."""
        top = float(self.scores.abs().max()) or 1.0
        out = []
        for token, score in zip(self.tokens, self.scores.tolist()):
            level = int(min(abs(score) / top, 1.0) * 5)
            colour = (22 + 6 * level * 6) if score >= 0 else (52 + 36 * level)  # xterm-256 greens / reds
            out.append(f"\033[48;5;{min(colour, 231)}m{token}\033[0m" if level else token)
        return "".join(out)

    def to_html(self) -> str:
        """The prompt as HTML spans shaded by score (green helps f, red hurts it), scores in tooltips."""
        top = float(self.scores.abs().max()) or 1.0
        spans = []
        for token, score in zip(self.tokens, self.scores.tolist()):
            alpha = min(abs(score) / top, 1.0)
            rgb = "0,160,60" if score >= 0 else "200,30,30"
            spans.append(
                f'<span title="{score:.4g}" style="background: rgba({rgb},{alpha:.2f})">'
                f"{html.escape(token)}</span>"
            )
        return f'<p style="font-family: monospace; white-space: pre-wrap">{"".join(spans)}</p>'


def token_embeddings(model: HookedModel, ids: list[int]) -> Tensor:
    """[len(ids), d_model] the model's token embeddings of `ids` (e.g. to build a baseline)."""
    with torch.no_grad(), model.capture([model.token_embed_hook]) as captured:
        model(torch.tensor([ids], device=model.device))
    return captured[model.token_embed_hook][0]


@uses_model
def token_ig(
    model: HookedModel,
    prompt: str,
    continuation: str | None = None,
    *,
    target: str | int | None = None,
    baseline: Tensor | None = None,
    steps: int = 64,
    quadrature: Quadrature = "gauss-legendre",
    max_rows: int = 32,
    compat: str | None = None,
    warn: bool = True,
) -> TokenAttribution:
    """Token attributions of `prompt` for log p(continuation | prompt), or for the logit of `target`.

    Args:
        baseline: [n_prompt_tokens, d_model] embeddings to start from (default zeros; with RMSNorm models
            near-zero embeddings make the path steep close to the baseline, so IG needs more steps there, or
            a baseline such as a common token's embedding at every position).
        quadrature: a rule of `circuits.quadrature`; `idgi` spends each step's exact change of f over the
            tokens by their share of the squared gradient (the scores then sum to f(input) - f(baseline)
            exactly, at any number of steps; a token equal to its baseline still gets a share, as IDGI's
            shares follow the gradient alone).
        compat: "grains-code" scores each continuation token with the logits at its own position (the
            released GrAInS code's off-by-one) instead of the position before it.
        warn: a `CircuitsWarning` when the scores miss completeness by more than 10% (callers that
            attribute many prompts report their misses once instead).
    """
    if (continuation is None) == (target is None):
        raise InputError("give exactly one of continuation (log-prob form) or target (logit form)")
    if compat not in (None, "grains-code"):
        raise InputError(f"unknown compat {compat!r}; the only one is 'grains-code'")
    check_steps(steps, "steps")
    check_count(max_rows, "max_rows")
    prompt_ids = model.to_ids([prompt])[0]
    n_prompt = len(prompt_ids)
    ids, f = _objective(model, prompt_ids, continuation, target, compat)
    start = 1 if model.prepend_bos else 0  # BOS keeps its embedding
    e = token_embeddings(model, ids)  # [P + C, d]
    base = torch.zeros_like(e[:n_prompt]) if baseline is None else baseline.to(e)
    if base.shape != e[:n_prompt].shape:
        raise InputError(f"baseline must have shape {tuple(e[:n_prompt].shape)}, got {tuple(base.shape)}")
    base = base.clone()
    base[:start] = e[:start]
    diff = e[:n_prompt] - base
    batch = torch.tensor([ids], device=model.device)

    def run(points: Tensor, grad: bool) -> tuple[Tensor, Tensor | None]:
        """f at base + alpha (e - base) for each alpha in `points`, and the gradients if asked."""
        leaf = (base[None] + points[:, None, None].to(e) * diff[None]).requires_grad_(grad)

        def replace(x: Tensor) -> Tensor:
            return torch.cat([leaf.to(x.dtype), x[:, n_prompt:]], dim=1)

        with model.hooks([(model.token_embed_hook, replace)]), torch.set_grad_enabled(grad):
            out = f(model(batch.expand(len(points), -1))).to(model.device)  # from the logits' device
            if not grad:
                return out.detach(), None
            (g,) = torch.autograd.grad(out.sum(), leaf)
        return out.detach(), g.float()

    scores, endpoints = _integrated(model, run, diff, quadrature, steps, max_rows, start)
    tokens = [str(model.tokenizer.decode([t])) for t in prompt_ids]
    result = TokenAttribution(tokens, scores, float(endpoints[1] - endpoints[0]))
    if warn:
        warn_incomplete_tokens(result.relative_error, f"token attributions of {prompt[:40]!r}", steps)
    return result


def warn_incomplete_tokens(relative_error: float, what: str, steps: int) -> None:
    """`warn_if_incomplete` for token IG, with what to do about it."""
    advice = (
        f"Use more steps (now {steps}), quadrature='idgi' (sums exactly), or a baseline nearer the prompt "
        "(near-zero embeddings make RMSNorm models steep at the baseline)"
    )
    warn_if_incomplete(relative_error, what, advice, stacklevel=4)


def _objective(
    model: HookedModel,
    prompt_ids: list[int],
    continuation: str | None,
    target: str | int | None,
    compat: str | None,
) -> tuple[list[int], Callable[[Tensor], Tensor]]:
    """The ids run (prompt, then the continuation's) and f: logits [rows, P + C, vocab] -> [rows], the
    continuation's log-probability or the target's logit after the prompt."""
    n_prompt = len(prompt_ids)
    if continuation is not None:
        cont_ids = model.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not cont_ids:
            raise InputError(f"the continuation {continuation!r} has no tokens")
        target_id = None
    else:
        cont_ids = []
        if isinstance(target, bool) or not isinstance(target, int | str):
            raise InputError(f"target must be a token id or the text of one token, got {target!r}")
        target_id = target if isinstance(target, int) else model.single_token_id(target)
        if not 0 <= target_id < model.d_vocab:
            raise InputError(
                f"target token id {target_id} is outside the vocabulary [0, {model.d_vocab}) of "
                f"{model.spec.name} (negative ids do not count from the end here)"
            )
    ids = prompt_ids + list(cont_ids)

    def f(logits: Tensor) -> Tensor:
        if target_id is not None:
            return logits[:, n_prompt - 1, target_id].float()
        logp = logits.float().log_softmax(-1)
        offset = 0 if compat == "grains-code" else 1
        positions = torch.arange(n_prompt, len(ids)) - offset
        return logp[:, positions, torch.tensor(cont_ids)].sum(-1)

    return ids, f


def _integrated(
    model: HookedModel,
    run: Callable[[Tensor, bool], tuple[Tensor, Tensor | None]],
    diff: Tensor,
    quadrature: Quadrature,
    steps: int,
    max_rows: int,
    start: int,
) -> tuple[Tensor, Tensor]:
    """Per-token scores [P] of the path `run` walks (input - baseline = `diff` [P, d]; tokens before
    `start` are not integrated over), by `quadrature` with `steps` points, and f at the path's ends."""
    n_prompt = diff.shape[0]
    alphas, weights = quadrature_rule(quadrature, steps)
    grad_sum = torch.zeros_like(diff, dtype=torch.float32)
    values, moved = [], []  # IDGI: f at the points, and the gradients of the tokens integrated over
    for part in process_chunks(len(alphas), max_rows, model.device, desc="", unit="IG step", quiet=True):
        value, grad = run(alphas[part.start : part.stop].float(), True)
        assert grad is not None
        if not bool(torch.isfinite(grad).all()):
            at = alphas[part.start : part.stop][~torch.isfinite(grad).flatten(1).all(1).cpu()].tolist()
            raise NumericalError(
                f"non-finite gradients along the IG path at alpha = {', '.join(f'{a:g}' for a in at)}: "
                "where alpha = 0 meets the zero-embedding baseline, a norm (RMSNorm, LayerNorm) divides by "
                "the size of a zero vector. Use a rule that never evaluates alpha = 0 (quadrature="
                "'gauss-legendre' or 'midpoint'), or a baseline away from zero (baseline=: e.g. a common "
                "token's embedding at every position)"
            )
        w = weights[part.start : part.stop].float().to(grad.device)
        grad_sum += (w[:, None, None] * grad).sum(0)
        if quadrature == "idgi":
            values.append(value)
            moved.append(grad[:, start:n_prompt])  # BOS is not integrated over
    grad_sum = sum_tensor(grad_sum, model.device).float()
    endpoints, _ = run(torch.tensor([0.0, 1.0]), False)
    if quadrature != "idgi":
        return (diff.float() * grad_sum).sum(-1).cpu(), endpoints
    grads = gather_rows(torch.cat(moved), model.device)  # [K, tokens, d], in step order
    path = gather_rows(torch.cat(values), model.device)
    per_feature = idgi(grads.flatten(1), torch.cat([path, endpoints[1:]]))
    scores = torch.zeros(n_prompt)
    scores[start:] = per_feature.reshape(grads.shape[1:]).sum(-1).float().cpu()
    return scores, endpoints


@uses_model
def contrastive_token_ig(
    model: HookedModel, prompt: str, preferred: str, dispreferred: str, **options: Any
) -> TokenAttribution:
    """IG of log p(preferred | prompt) minus IG of log p(dispreferred | prompt), per prompt token; with
    `warn` (default), a `CircuitsWarning` when the difference misses completeness by more than 10%."""
    warn = options.pop("warn", True)
    result = token_ig(model, prompt, preferred, warn=False, **options) - token_ig(
        model, prompt, dispreferred, warn=False, **options
    )
    if warn:
        what = f"contrastive token attributions of {prompt[:40]!r}"
        warn_incomplete_tokens(result.relative_error, what, options.get("steps", 64))
    return result
