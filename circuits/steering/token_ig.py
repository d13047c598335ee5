"""Token attributions of a language model's prompt: integrated gradients on paths that converge,
sequential IG, layer IG, and gradient x input (GrAInS' attribution is the first).

f is either the log-probability of a continuation (sum over its tokens of log p(token | everything before
it); the continuation is appended to the prompt and never moved) or the logit of a target token at the
prompt's last position. With a baseline b and the input e (token embeddings, or with `layer` the residual
stream after that layer), the paths are (docs/design.md, "Token attributions"):
- joint (IG, Sundararajan et al. 2017): all tokens move together along b + alpha (e - b) and
      score_t = (e - b)_t . integral_0^1 df/de_t(alpha) d alpha,
  so sum_t score_t = f(e) - f(b) (completeness);
- sequential (SIG, Enguehard 2023): token t moves alone, the others stay at the input, and its score is
  complete on its own path: score_t = f(e) - f(e with token t at its baseline);
- gradient x input: (e - b)_t . df/de_t at the input, a first-order estimate, not complete by design.

Two choices make the integrals converge on real language models (measured in docs/results.md):
- the first position stays at its input (BOS, or the first token of a model without one) and is not
  attributed: it is the attention sink, and moving it with the rest switches the sink off part-way along
  the path, where f jumps (SmolLM2: the answer's logit drops by 14 within 0.005 of alpha);
- the baseline is a real token's embedding (the pad token, else eos, at every position), not zero: at the
  zero embedding RMSNorm divides by ~0 and the integrand is unbounded near alpha = 0.
What is left is rough but continuous, so the default rule is adaptive: f is known at every point visited,
so each interval's trapezoid error (f(b) - f(a) - (b - a)(f'(a) + f'(b)) / 2) is known exactly, and the
worst intervals are halved until the errors add up to less than `tolerance` x |f(e) - f(b)| or the budget of
`steps` gradient evaluations is spent. Fixed rules (`circuits.quadrature`, IDGI included) remain available.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from circuits.data import check_count
from circuits.distributed import gather_rows, process_chunks, sum_tensor
from circuits.errors import InputError, NumericalError
from circuits.models.hooked import HookedModel, uses_model
from circuits.quadrature import QUADRATURES, check_steps, idgi, warn_if_incomplete
from circuits.quadrature import quadrature as quadrature_rule

Baseline = Literal["pad", "zero"]
Path = Literal["joint", "sequential"]
RULES = ("adaptive", *QUADRATURES)


@dataclass(frozen=True)
class TokenIGOptions:
    """How token IG integrates (defaults: the converging ones; see the module docstring).

    Attributes:
        steps: gradient evaluations per path (for `adaptive`, the budget; it stops earlier once the
            trapezoid errors are below `tolerance`).
        quadrature: "adaptive" or a fixed rule of `circuits.quadrature` ("idgi" sums exactly by
            construction, spending each step's change of f by the squared gradient's shares). Under
            torchrun a fixed joint rule splits its steps over the processes; the adaptive rule refines
            one round after another and runs whole on every process.
        baseline: "pad" (the pad token's embedding, else eos, at every position), "zero", or a tensor
            [n_prompt_tokens, d_model] (embeddings; with `layer`, the tokens' embeddings are run to it).
        path: "joint" (IG) or "sequential" (one token at a time).
        layer: None (token embeddings) or a layer whose output (residual stream) is attributed, per
            position, from the activations the baseline produces to the input's (layer IG).
        keep_first: the first position stays at its input and is not attributed (the attention sink).
        tolerance: the relative completeness error `adaptive` aims for.
        max_rows: path points run in one batch.
        compat: "grains-code" scores each continuation token with the logits at its own position (the
            released GrAInS code's off-by-one) instead of the position before it.
    """

    steps: int = 64
    quadrature: str = "adaptive"
    baseline: Baseline | Tensor = "pad"
    path: Path = "joint"
    layer: int | None = None
    keep_first: bool = True
    tolerance: float = 0.01
    max_rows: int = 32
    compat: str | None = None

    def __post_init__(self) -> None:
        check_steps(self.steps, "steps")
        check_count(self.max_rows, "max_rows")
        if self.quadrature not in RULES:
            raise InputError(f"unknown quadrature {self.quadrature!r}; choose one of {', '.join(RULES)}")
        if self.quadrature == "adaptive" and self.steps < 3:
            raise InputError(
                f"the adaptive rule needs steps >= 3 (both ends and a midpoint), got {self.steps}"
            )
        if not isinstance(self.baseline, Tensor) and self.baseline not in ("pad", "zero"):
            raise InputError(
                f"baseline must be 'pad', 'zero' or a tensor of embeddings, got {self.baseline!r}"
            )
        if self.path not in ("joint", "sequential"):
            raise InputError(f"path must be 'joint' or 'sequential', got {self.path!r}")
        if self.path == "sequential" and self.quadrature == "idgi":
            raise InputError(
                "IDGI on a sequential path gives each token exactly f(e) - f(e with the token at its "
                "baseline) (occlusion), whatever the gradients; use another rule"
            )
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise InputError(f"layer must be None or a layer index, got {self.layer!r}")
        if (
            isinstance(self.tolerance, bool)
            or not isinstance(self.tolerance, int | float)
            or self.tolerance <= 0
        ):
            raise InputError(f"tolerance must be a positive number, got {self.tolerance!r}")
        if self.compat not in (None, "grains-code"):
            raise InputError(f"unknown compat {self.compat!r}; the only one is 'grains-code'")


def token_options(options: TokenIGOptions | None, changes: dict[str, Any]) -> TokenIGOptions:
    """`options` (default `TokenIGOptions()`) with the named fields changed; unknown names are refused."""
    options = options or TokenIGOptions()
    fields = {f.name for f in dataclasses.fields(TokenIGOptions)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise InputError(f"unknown token IG options {unknown}; the options are {sorted(fields)}")
    return dataclasses.replace(options, **changes)


@dataclass(frozen=True)
class TokenAttribution:
    """Scores of a prompt's tokens and the change they should add up to.

    `delta` is f(input) - f(baseline) on a joint path; on sequential paths each token's score should equal
    its own change, `token_deltas` [n_prompt_tokens] = f(e) - f(e with that token at its baseline), and
    `delta` is their sum."""

    tokens: list[str]  # the prompt's tokens, as text
    scores: Tensor  # [n_prompt_tokens] (0 where not attributed: the first position by default)
    delta: float
    token_deltas: Tensor | None = None

    @property
    def total(self) -> float:
        return float(self.scores.sum())

    @property
    def abs_error(self) -> float:
        """Completeness error: |sum of scores - delta|; on sequential paths sum_t |score_t - delta_t|."""
        if self.token_deltas is None:
            return abs(self.total - self.delta)
        return float((self.scores - self.token_deltas).abs().sum())

    @property
    def relative_error(self) -> float:
        """`abs_error` / |delta| (sequential: / sum_t |delta_t|), as `circuits.attribution.Completeness`."""
        scale = abs(self.delta) if self.token_deltas is None else float(self.token_deltas.abs().sum())
        return self.abs_error / max(scale, 1e-12)

    def __sub__(self, other: TokenAttribution) -> TokenAttribution:
        if self.tokens != other.tokens:
            raise InputError("attributions of different prompts cannot be subtracted")
        deltas = None
        if self.token_deltas is not None and other.token_deltas is not None:
            deltas = self.token_deltas - other.token_deltas
        return TokenAttribution(self.tokens, self.scores - other.scores, self.delta - other.delta, deltas)

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


Runner = Callable[[Tensor, bool], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class _Site:
    """Where the path runs: the hook whose first `n_prompt` positions are replaced, the input's values
    there and the baseline's ([n_prompt, d] each), and the first position attributed."""

    hook: str
    input: Tensor
    baseline: Tensor
    first: int


def _site(model: HookedModel, ids: list[int], options: TokenIGOptions) -> _Site:
    """The path's ends at the options' site, for the prompt `ids` (its activations do not depend on what
    follows it)."""
    n_prompt = len(ids)
    e = token_embeddings(model, ids)
    first = 1 if options.keep_first or model.prepend_bos else 0  # BOS always keeps its embedding
    if isinstance(options.baseline, Tensor):
        base = options.baseline.to(e).clone()
        if base.shape != e.shape:
            raise InputError(f"baseline must have shape {tuple(e.shape)}, got {tuple(base.shape)}")
    elif options.baseline == "zero":
        base = torch.zeros_like(e)
    else:
        filler = model.tokenizer.pad_token_id
        filler = model.tokenizer.eos_token_id if filler is None else filler
        if filler is None:
            raise InputError(f"{model.spec.name}'s tokenizer has no pad or eos token: give baseline=")
        base = token_embeddings(model, [filler] * n_prompt)
    base[:first] = e[:first]
    if options.layer is None:
        return _Site(model.token_embed_hook, e, base, first)
    if not 0 <= options.layer < model.spec.n_layers:
        raise InputError(f"layer must be in 0..{model.spec.n_layers - 1}, got {options.layer}")
    hook = model.resid_post_hook(options.layer)
    batch = torch.tensor([ids], device=model.device)

    with torch.no_grad(), model.capture([hook]) as captured:
        model(batch)
    layer_input = captured[hook][0].float().clone()
    with (
        torch.no_grad(),
        model.hooks([(model.token_embed_hook, lambda x: base[None].to(x.dtype))]),
        model.capture([hook]) as captured,
    ):
        model(batch)
    layer_base = captured[hook][0].float().clone()
    return _Site(hook, layer_input, layer_base, first)


Objective = list[tuple[list[int], Callable[[Tensor], Tensor], float]]
# f = sum of sign * f_i(logits of ids_i): the ids run (the prompt, then a continuation's), f_i of their
# logits [rows, len(ids_i), vocab] -> [rows], and the sign (-1 for the dispreferred side of a contrast)


def _objectives(
    model: HookedModel,
    prompt_ids: list[int],
    continuation: str | None,
    target: str | int | None,
    compat: str | None,
    dispreferred: str | None = None,
) -> Objective:
    if (continuation is None) == (target is None):
        raise InputError("give exactly one of continuation (log-prob form) or target (logit form)")
    found = [(*_objective(model, prompt_ids, continuation, target, compat), 1.0)]
    if dispreferred is not None:
        found.append((*_objective(model, prompt_ids, dispreferred, None, compat), -1.0))
    return found


def _runner(model: HookedModel, n_prompt: int, objective: Objective, hook: str) -> Runner:
    """run(points [R, n_prompt, d], grad) -> (f [R], df/dpoints [R, n_prompt, d] or None), the points
    standing in for the hook's first `n_prompt` positions."""

    def run(points: Tensor, grad: bool) -> tuple[Tensor, Tensor | None]:
        leaf = points.detach().requires_grad_(grad)

        def replace(x: Tensor) -> Tensor:
            return torch.cat([leaf.to(x.device, x.dtype), x[:, n_prompt:]], dim=1)

        with model.hooks([(hook, replace)]), torch.set_grad_enabled(grad):
            out = sum(
                sign * f(model(torch.tensor([ids], device=model.device).expand(len(points), -1)))
                for ids, f, sign in objective
            )
            assert isinstance(out, Tensor)
            out = out.to(model.device)  # from the logits' device
            if not grad:
                return out.detach(), None
            (g,) = torch.autograd.grad(out.sum(), leaf)
        return out.detach(), g.float()

    return run


def _attribute(
    model: HookedModel, prompt_ids: list[int], objective: Objective, options: TokenIGOptions
) -> TokenAttribution:
    site = _site(model, prompt_ids, options)
    run = _runner(model, len(prompt_ids), objective, site.hook)
    tokens = [str(model.tokenizer.decode([t])) for t in prompt_ids]
    if options.path == "sequential":
        scores, deltas = _sequential(run, site, options)
        return TokenAttribution(tokens, scores, float(deltas.sum()), deltas)
    scores, delta = _joint(model, run, site, options)
    return TokenAttribution(tokens, scores, delta)


@uses_model
def token_ig(
    model: HookedModel,
    prompt: str,
    continuation: str | None = None,
    *,
    target: str | int | None = None,
    options: TokenIGOptions | None = None,
    warn: bool = True,
    **changes: Any,
) -> TokenAttribution:
    """Token attributions of `prompt` for log p(continuation | prompt), or for the logit of `target`.

    Args:
        options: `TokenIGOptions` (default: adaptive rule, 64 steps, pad baseline, joint path, first
            position kept); keyword arguments change single fields (`steps=16`, `path="sequential"`).
        warn: a `CircuitsWarning` when the scores miss completeness by more than 10%, saying what to do
            (callers that attribute many prompts report their misses once instead).
    """
    options = token_options(options, changes)
    prompt_ids = model.to_ids([prompt])[0]
    objective = _objectives(model, prompt_ids, continuation, target, options.compat)
    result = _attribute(model, prompt_ids, objective, options)
    if warn:
        warn_incomplete_tokens(result.relative_error, f"token attributions of {prompt[:40]!r}", options)
    return result


@uses_model
def contrastive_token_ig(
    model: HookedModel,
    prompt: str,
    preferred: str,
    dispreferred: str,
    *,
    options: TokenIGOptions | None = None,
    warn: bool = True,
    **changes: Any,
) -> TokenAttribution:
    """IG of f = log p(preferred | prompt) - log p(dispreferred | prompt) per prompt token: the IG of each
    side's log-probability on one shared path, subtracted (IG is linear in f), with the adaptive rule's
    refinement aimed at the contrast's own completeness. With `warn` (default), a `CircuitsWarning` when
    it misses completeness by more than 10%."""
    options = token_options(options, changes)
    prompt_ids = model.to_ids([prompt])[0]
    objective = _objectives(model, prompt_ids, preferred, None, options.compat, dispreferred)
    result = _attribute(model, prompt_ids, objective, options)
    if warn:
        what = f"contrastive token attributions of {prompt[:40]!r}"
        warn_incomplete_tokens(result.relative_error, what, options)
    return result


@uses_model
def gradient_x_input(
    model: HookedModel,
    prompt: str,
    continuation: str | None = None,
    *,
    target: str | int | None = None,
    dispreferred: str | None = None,
    options: TokenIGOptions | None = None,
    **changes: Any,
) -> TokenAttribution:
    """(e - b)_t . df/de_t at the input, per prompt token (b the options' baseline, e the embeddings or
    with `layer` that layer's output; f minus log p(dispreferred) when given): one backward pass, a
    first-order estimate of f(e) - f(b) that is not complete by design (`delta` holds the true change, so
    `relative_error` shows how far off)."""
    options = token_options(options, changes)
    prompt_ids = model.to_ids([prompt])[0]
    objective = _objectives(model, prompt_ids, continuation, target, options.compat, dispreferred)
    site = _site(model, prompt_ids, options)
    run = _runner(model, len(prompt_ids), objective, site.hook)
    value, grad = run(site.input[None], True)
    assert grad is not None
    scores = ((site.input - site.baseline) * grad[0]).sum(-1).cpu()
    base_value, _ = run(site.baseline[None], False)
    tokens = [str(model.tokenizer.decode([t])) for t in prompt_ids]
    return TokenAttribution(tokens, scores, float(value[0] - base_value[0]))


def _joint(model: HookedModel, run: Runner, site: _Site, options: TokenIGOptions) -> tuple[Tensor, float]:
    """Scores [n_prompt] along base + alpha (input - base) and f(input) - f(base)."""
    diff = site.input - site.baseline

    def along(alphas: Tensor, grad: bool) -> tuple[Tensor, Tensor | None]:
        return run(site.baseline[None] + alphas[:, None, None].to(diff) * diff[None], grad)

    if options.quadrature != "adaptive":
        scores, ends = _integrated(
            model, along, diff, options.quadrature, options.steps, options.max_rows, site.first
        )
        return scores, float(ends[1] - ends[0])

    def slopes(alphas: Tensor) -> tuple[Tensor, Tensor]:
        value, grad = along(alphas, True)
        assert grad is not None
        _check_finite(grad, alphas)
        return value.double().cpu(), (diff * grad).sum(-1).double().cpu()  # [n], [n, n_prompt]

    integral, delta = adaptive_path(slopes, options.steps, options.tolerance, options.max_rows)
    return integral.float(), delta


def _sequential(run: Runner, site: _Site, options: TokenIGOptions) -> tuple[Tensor, Tensor]:
    """Scores [n_prompt] and each token's own change [n_prompt], one path per token after `first`."""
    n_prompt = site.input.shape[0]
    scores, deltas = torch.zeros(n_prompt), torch.zeros(n_prompt)
    for t in range(site.first, n_prompt):
        scores[t], deltas[t] = _one_token(run, site, t, options)
    return scores, deltas


def _one_token(run: Runner, site: _Site, t: int, options: TokenIGOptions) -> tuple[float, float]:
    """Token t's score on its own path (the others at the input) and f(input) - f(t at its baseline)."""
    diff = site.input[t] - site.baseline[t]

    def points(alphas: Tensor) -> Tensor:
        moved = site.input[None].repeat(len(alphas), 1, 1)
        moved[:, t] = site.baseline[t] + alphas[:, None].to(diff) * diff
        return moved

    def slopes(alphas: Tensor) -> tuple[Tensor, Tensor]:
        value, grad = run(points(alphas), True)
        assert grad is not None
        _check_finite(grad, alphas)
        return value.double().cpu(), (grad[:, t] @ diff)[:, None].double().cpu()

    if options.quadrature == "adaptive":
        integral, delta = adaptive_path(slopes, options.steps, options.tolerance, options.max_rows)
        return float(integral[0]), delta
    alphas, weights = quadrature_rule(options.quadrature, options.steps)
    rows = options.max_rows
    integral = weights @ torch.cat([slopes(alphas[i : i + rows])[1] for i in range(0, len(alphas), rows)])
    ends, _ = run(points(torch.tensor([0.0, 1.0])), False)
    return float(integral[0]), float(ends[1] - ends[0])


def adaptive_path(
    slopes: Callable[[Tensor], tuple[Tensor, Tensor]], steps: int, tolerance: float, max_rows: int
) -> tuple[Tensor, float]:
    """The integrals over alpha in [0, 1] of F per-feature slopes whose sum is the derivative of a known
    f, by trapezoids refined where f bends.

    `slopes(alphas [n])` gives f [n] and the slopes [n, F] at those points (float64). Each interval's
    trapezoid error is known exactly, e_i = f(b) - f(a) - (b - a) (s(a) + s(b)).sum() / 2, since f is
    evaluated at both ends; starting from 16 equal intervals, the fewest worst intervals that hold half of
    sum_i |e_i| are halved (up to `max_rows` per round) until sum_i |e_i| <= tolerance |f(1) - f(0)| or
    `steps` points are spent. Returns the per-feature integrals [F] (summing to f(1) - f(0) - sum_i e_i)
    and f(1) - f(0).
    """
    alphas = torch.linspace(0, 1, min(17, steps), dtype=torch.float64)
    values, grads = slopes(alphas)
    while True:
        widths = alphas.diff()
        pieces = widths[:, None] / 2 * (grads[:-1] + grads[1:])  # [intervals, F]
        errors = (values.diff() - pieces.sum(-1)).abs()
        delta = float(values[-1] - values[0])
        left = steps - len(alphas)
        if float(errors.sum()) <= tolerance * abs(delta) or left <= 0:
            return pieces.sum(0), delta
        errors[widths < 1e-6] = 0  # halving further would not be resolved in float32 inputs
        ranked = errors.sort(descending=True).values.cumsum(0)
        needed = int((ranked < ranked[-1] / 2).sum()) + 1  # the worst intervals holding half the error
        k = min(left, max_rows, needed, int((errors > 0).sum()))
        if k == 0:
            return pieces.sum(0), delta
        worst = errors.topk(k).indices
        new = alphas[worst] + widths[worst] / 2
        new_values, new_grads = slopes(new)
        alphas, order = torch.cat([alphas, new]).sort()
        values, grads = torch.cat([values, new_values])[order], torch.cat([grads, new_grads])[order]


def _check_finite(grad: Tensor, alphas: Tensor) -> None:
    if not bool(torch.isfinite(grad).all()):
        at = alphas[~torch.isfinite(grad).flatten(1).all(1).cpu()].tolist()
        raise NumericalError(
            f"non-finite gradients along the IG path at alpha = {', '.join(f'{a:g}' for a in at)}: "
            "where alpha = 0 meets the zero-embedding baseline, a norm (RMSNorm, LayerNorm) divides by the "
            "size of a zero vector. Use the default baseline='pad' (a real token's embedding), or a rule "
            "that never evaluates alpha = 0 (quadrature='gauss-legendre' or 'midpoint')"
        )


def warn_incomplete_tokens(relative_error: float, what: str, options: TokenIGOptions) -> None:
    """`warn_if_incomplete` for token IG, with what to do about it."""
    if options.quadrature == "adaptive":
        advice = f"Raise the budget steps (now {options.steps}); the adaptive rule refines where f bends"
    else:
        advice = f"Use more steps (now {options.steps}) or the default quadrature='adaptive'"
    if options.baseline == "zero" or not options.keep_first:
        advice += (
            "; the zero baseline (RMSNorm divides by ~0 there) and moving the first position (the "
            "attention sink) make the path rough: the defaults baseline='pad', keep_first=True avoid both"
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
    run: Runner,
    diff: Tensor,
    quadrature: str,
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
        _check_finite(grad, alphas[part.start : part.stop])
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
