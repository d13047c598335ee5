"""AtP*'s two corrections to attribution patching (Kramár et al. 2024, arXiv 2403.00745).

QK fix. An edge u -> a{l}.h{h}<q> moves head h's queries by dq = W_Q[h] (N(x + delta_u) - N(x)), exactly
through the attention norm N (and the head's q norm where there is one). After that norm the scores are
linear in q (RoPE and the scale are linear maps), so the patched scores are s + J dq, with J = ds/dq read
off the clean forward pass by autograd (one local backward per key position, `score_jacobians`). The
pattern is then recomputed exactly, A' = softmax(s + J dq), and only the rest of the model is linearised:
the edge's score is sum_{t,j} (A' - A)[t, j] dM/dA[t, j]. Keys alike: a key edge moves the scores of
every query head reading that key head. EAP's q/k edge scores are the same expression with the softmax
linearised too (A' - A ~ A (ds - sum_j A ds)), so AtP*'s edge score is EAP's plus sum G . (dA - dA_lin),
both terms computed here from the same J (the tests check that the linear part is EAP's).

GradDrop. For each layer l a backward pass with the gradient through layer l's residual writes (its
attention and MLP outputs) set to zero; `QKCapture` keeps dM/dA for each of these passes, so the fix
applies to every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from circuits.errors import UnsupportedModelError
from circuits.graph import Graph
from circuits.models.checks import pattern_problem, probe_ids, probed
from circuits.models.hooked import HookedModel, HookFn
from circuits.models.norms import NormForm, norm_form, norm_jvp
from circuits.models.wiring import wiring
from circuits.sources import SourceOutputs


@dataclass
class _Layer:
    """What one attention layer's forward pass leaves for the fix."""

    resid: Tensor | None = None  # [b, P, d] the attention norm's input
    proj: dict[str, Tensor] = field(default_factory=dict)  # q, k projection outputs [b, P, n * d_head]
    leaf: dict[str, Tensor] = field(default_factory=dict)  # q, k where the scores read them (graph views)
    scores: Tensor | None = None  # [b, H, P, P] as the softmax reads them (graph)
    pattern: Tensor | None = None  # [b, H, P, P]
    grads: list[Tensor] = field(default_factory=list)  # dM/dA per backward pass, in pass order


class QKCapture:
    """Forward hooks keeping each layer's attention inputs, scores and pattern, backward hooks keeping
    dM/dA, and (GradDrop) the switch that zeroes the gradient through one layer's residual writes.

    Set `drop` to a layer before a backward pass to drop that layer's writes in it (None: drop nothing).
    """

    def __init__(self, model: HookedModel, graph: Graph) -> None:
        mixers = sorted({*graph.spec.mixer_layers, *graph.spec.parallel_mixer_layers})
        if mixers:
            raise UnsupportedModelError(
                f"{model.spec.name}: AtP*'s QK fix and GradDrop are written here for models whose every "
                f"layer is attention; layers {mixers} have another token mixer"
            )
        if model.layer_scalars() is not None:
            raise UnsupportedModelError(
                f"{model.spec.name}: its layers rescale the residual stream (learned layer scalars), which "
                "AtP*'s QK fix and GradDrop do not apply to the changes they move q and k by"
            )
        latent = [layer for layer in model.spec.attention_layers if model.latent_attention(layer) is not None]
        if latent:
            raise UnsupportedModelError(
                f"{model.spec.name}: AtP*'s QK fix moves each head's q and k through the attention norm and "
                f"one projection slice; layers {latent} have multi-head latent attention (q, k through "
                "latent projections, norms and the rotary embedding), for which the fix is not written: use "
                "method='eap' or the exact method for their q/k edges"
            )
        problem = probed(model, "pattern", pattern_problem)
        if problem:
            raise UnsupportedModelError(
                f"{model.spec.name}: AtP*'s QK fix needs the attention pattern: {problem}"
            )
        problem = probed(model, "linear scores", _scores_problem)
        if problem:
            raise UnsupportedModelError(f"{model.spec.name}: AtP*'s QK fix cannot be computed: {problem}")
        self.model, self.graph = model, graph
        self.layers = [_Layer() for _ in range(graph.spec.n_layers)]
        self.drop: int | None = None

    def release(self) -> None:
        """Forget the kept tensors. Call when done: the graph they hold holds the tensor hooks that hold
        this object, a cycle through autograd's C++ graph that Python's collector cannot free."""
        for state in self.layers:  # in place: the tensor hooks hold these objects themselves
            state.__init__()  # type: ignore[misc]

    def hooks(self) -> list[tuple[str, HookFn]]:
        """At each layer's q and k destinations: the residual and the projections (and what the scores
        read, after any q/k norm), then the scores and the pattern; at each layer's source outputs, the
        GradDrop switch."""
        model = self.model
        sites = wiring(model, self.graph.spec)
        hooks: list[tuple[str, HookFn]] = []
        for dst in sites.destinations:
            if dst.kind not in ("q", "k"):
                continue
            layer, letter, state = dst.layer, dst.kind, self.layers[dst.layer]
            if letter == "q":
                hooks.append((dst.residual_hook, self._keep_resid(state)))  # type: ignore[arg-type]
            hooks.append((model.qkv_out_hook(layer, letter), self._keep_proj(state, letter)))
            hooks.append((model.qk_score_input_hook(layer, letter), self._keep_leaf(state, letter)))
            if letter == "k":
                hooks.append((model.attn_scores_hook(layer), self._keep_scores(state)))
                hooks.append((model.attn_pattern_hook(layer), self._keep_pattern(state)))
        for src in sites.sources:
            if src.kind != "input":
                hooks.append((src.output_hook, self._dropped(src.layer)))
        return hooks

    @staticmethod
    def _keep_resid(state: _Layer) -> HookFn:
        def keep(x: Tensor) -> None:
            state.resid = x.detach()

        return keep

    @staticmethod
    def _keep_proj(state: _Layer, letter: str) -> HookFn:
        def keep(x: Tensor) -> None:
            state.proj[letter] = x.detach()

        return keep

    @staticmethod
    def _keep_leaf(state: _Layer, letter: str) -> HookFn:
        def keep(x: Tensor) -> Tensor:
            y = x.view_as(x)
            state.leaf[letter] = y
            return y

        return keep

    @staticmethod
    def _keep_scores(state: _Layer) -> HookFn:
        def keep(x: Tensor) -> None:
            state.scores = x

        return keep

    @staticmethod
    def _keep_pattern(state: _Layer) -> HookFn:
        def keep(x: Tensor) -> Tensor:
            state.pattern = x.detach()
            y = x.view_as(x)
            if y.requires_grad:
                y.register_hook(lambda g: state.grads.append(g.detach().float()))
            return y

        return keep

    def _dropped(self, layer: int) -> HookFn:
        def drop(x: Tensor) -> Tensor:
            y = x.view_as(x)
            if y.requires_grad:
                y.register_hook(lambda g: torch.zeros_like(g) if self.drop == layer else None)
            return y

        return drop


def score_jacobians(state: _Layer, n_heads: int, n_kv: int) -> tuple[Tensor, Tensor]:
    """J_q, J_k [b, H, P(query), P(key), d_head]: ds[b, h, t, j] / dq[b, h, t] and / dk[b, g(h), j].

    s[..., t, j] depends on q only through q_t and on k only through k_j, so the gradient of one key
    column's sum gives dq for every query at once; for keys, the query heads sharing a key head are taken
    one at a time (head h reads key head h // (H / G), as Hugging Face's repeat_kv arranges them).
    """
    s, q, k = state.scores, state.leaf.get("q"), state.leaf.get("k")
    if s is None or q is None or k is None:
        raise UnsupportedModelError("AtP*'s QK fix: the bridge did not run the attention score hooks")
    b, _, p, _ = s.shape
    rep = n_heads // n_kv
    # one-hot cotangents: key column j of every head (-> J_q), query row t of one head per key group
    eye = torch.eye(p, dtype=s.dtype, device=s.device)
    cols = eye[:, None, None, None, :].expand(p, b, n_heads, p, p)
    heads = torch.arange(n_heads, device=s.device)
    rows = eye[None, :, None, None, :, None] * (heads % rep == torch.arange(rep, device=s.device)[:, None])[
        :, None, None, :, None, None
    ].to(s.dtype)  # [rep, P(t), 1, H, P, 1]
    rows = rows.expand(rep, p, b, n_heads, p, p).reshape(rep * p, b, n_heads, p, p)
    try:
        g_q = _batched_grad(s, q, cols)  # [P(j), ...q]
        g_k = _batched_grad(s, k, rows)  # [rep * P(t), ...k]
    except RuntimeError as failure:  # the scores were not computed from the hooked q / k
        raise UnsupportedModelError(
            f"AtP*'s QK fix: the bridge's attention scores do not come from its q/k hooks ({failure})"
        ) from failure
    j_q = torch.stack([_head_major(g, n_heads) for g in g_q], dim=3).float()  # [b, H, P, P(j), e]
    g_k = torch.stack([_head_major(g, n_kv) for g in g_k]).float()  # [rep * P(t), b, G, P(j), e]
    g_k = g_k.reshape(rep, p, b, n_kv, p, -1).permute(2, 3, 0, 1, 4, 5)  # [b, G, rep, P(t), P(j), e]
    j_k = g_k.reshape(b, n_heads, p, p, -1)  # head h = g * rep + r
    return j_q, j_k


def _batched_grad(out: Tensor, wrt: Tensor, cotangents: Tensor, budget: int = 1 << 24) -> Tensor:
    """d<out, c>/d wrt for each cotangent c [n, ...out], in vmapped backward passes of bounded size."""
    per = max(1, budget // max(1, out.numel()))
    parts = [
        torch.autograd.grad(out, wrt, chunk, retain_graph=True, is_grads_batched=True)[0]
        for chunk in cotangents.split(per)
    ]
    return torch.cat(parts)


def _d_head(x: Tensor, n: int) -> int:
    return x.shape[-1] if x.dim() == 4 else x.shape[-1] // n


def _head_major(x: Tensor, n: int) -> Tensor:
    """[b, P, n * e] or [b, n, P, e] -> [b, n, P, e]."""
    if x.dim() == 4:
        return x
    return x.reshape(*x.shape[:2], n, -1).transpose(1, 2)


@dataclass(frozen=True)
class _Path:
    """How a layer's q (k) depends on the residual: the attention norm, W, and the per-head norm."""

    norm: nn.Module
    norm_form: NormForm | None  # None for an identity
    weight: Tensor  # [n, d_head, d_model]
    head_norm: nn.Module | None
    head_norm_form: NormForm | None
    across_heads: bool  # the q/k norm normalises all heads' projections together (OLMo-2)


def _path(model: HookedModel, layer: int, letter: str) -> _Path:
    norm = model.attn_norm(layer)
    form = None if isinstance(norm, nn.Identity) else norm_form(norm, model.spec.d_model)
    head_norm = model.qk_norm(layer, letter)  # type: ignore[arg-type]
    across = model.head_input_norm(layer, letter) is not None  # type: ignore[arg-type]
    width = model.spec.d_head * (model.spec.n_qkv_heads(letter) if across else 1)  # type: ignore[arg-type]
    head_form = None if head_norm is None else norm_form(head_norm, width)
    weight = model.W_qkv(layer, letter)  # type: ignore[arg-type]
    if weight.shape[1] != model.spec.d_head:
        raise UnsupportedModelError(
            f"{model.spec.name}: layer {layer}'s {letter} projection also computes the heads' output gates, "
            "which AtP*'s QK fix does not move"
        )
    if (form is None and not isinstance(norm, nn.Identity)) or (head_norm is not None and head_form is None):
        raise UnsupportedModelError(
            f"{model.spec.name}: AtP*'s QK fix needs the attention norm (and q/k norms) to be LayerNorm or "
            "RMSNorm, to move q and k exactly"
        )
    return _Path(norm, form, weight, head_norm, head_form, across)  # type: ignore[arg-type]


def _moves(path: _Path, resid: Tensor, proj: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """The exact and the linearised change of q (k) where the scores read it: [c, b, n, P, d_head].

    resid [b, P, d]; proj [b, P, n * d_head] the clean projection output (before any q/k norm); delta
    [c, b, P, d] for c sources. Every head's q moves by its own change: a norm over all heads together is
    applied to all of them moved at once, which moves head h exactly as patching head h alone would.
    """
    n, e, _ = path.weight.shape
    w = path.weight.float()
    x = resid.float()
    exact = torch.einsum("cbpd,ned->cbpne", path.norm(x + delta).float() - path.norm(x).float(), w)
    normed_delta = delta if path.norm_form is None else norm_jvp(path.norm_form, x, delta)
    linear = torch.einsum("cbpd,ned->cbpne", normed_delta, w)
    if path.head_norm is not None and path.across_heads:
        assert path.head_norm_form is not None
        q = proj.float()
        exact = (path.head_norm(q + exact.flatten(-2)).float() - path.head_norm(q).float()).view_as(linear)
        linear = norm_jvp(path.head_norm_form, q, linear.flatten(-2)).view_as(exact)
    elif path.head_norm is not None:
        assert path.head_norm_form is not None
        q = proj.float().reshape(*proj.shape[:2], n, e)
        exact = path.head_norm(q + exact).float() - path.head_norm(q).float()
        linear = norm_jvp(path.head_norm_form, q, linear)
    return exact.transpose(2, 3), linear.transpose(2, 3)


def _pattern_changes(scores: Tensor, pattern: Tensor, ds: Tensor, ds_linear: Tensor) -> Tensor:
    """softmax(s + ds) - A minus its linearisation A (ds - sum_j A ds): [c, b, H, P, P]."""
    exact = torch.softmax(scores + ds, dim=-1) - pattern
    linear = pattern * (ds_linear - (pattern * ds_linear).sum(-1, keepdim=True))
    return exact - linear


def _scores_problem(model: HookedModel) -> str | None:
    """Why the fix's model of the scores fails on a probe batch, or None. It needs: the pattern is the
    softmax of the hooked scores (no attention sinks), and moving q (k) at one layer by the exact change
    a residual-stream patch makes moves the scores by J times the change where the scores read it (no
    soft-capping, no norm after the rotary embedding)."""
    graph = Graph(model.spec)
    ids = probe_ids(model).to(model.device)
    capture = QKCapture.__new__(QKCapture)
    capture.model, capture.graph, capture.drop = model, graph, None
    capture.layers = [_Layer() for _ in range(model.spec.n_layers)]
    with (
        torch.enable_grad(),
        model.hooks([(model.input_hook, lambda x: x.detach().requires_grad_(True)), *capture.hooks()]),
    ):
        model(ids)
    try:
        return _scores_mismatch(model, ids, capture)
    finally:
        capture.release()


def _scores_mismatch(model: HookedModel, ids: Tensor, capture: QKCapture) -> str | None:
    gen = torch.Generator().manual_seed(0)
    spec = model.spec
    rep = spec.n_heads // spec.n_kv_heads
    precise = model.dtype in (torch.float32, torch.float64)
    atol = 1e-5 if precise else 2e-2  # softmax outputs: float32 rounding, or bf16 / fp16's (eps 8e-3)
    rtol = 1e-4 if precise else 5e-2
    group = torch.arange(spec.n_heads, device=model.device) // rep
    for layer, state in enumerate(capture.layers):
        if state.scores is None or state.pattern is None or state.resid is None:
            return "the bridge does not run the attention score hooks"
        if not torch.allclose(
            torch.softmax(state.scores.detach().float(), -1), state.pattern.float(), atol=atol
        ):
            return (
                f"layer {layer}'s pattern is not the softmax of its scores within {atol:g} in {model.dtype} "
                "(attention sinks or another term in the softmax?)"
            )
        j_q, j_k = score_jacobians(state, spec.n_heads, spec.n_kv_heads)
        delta = torch.randn(state.resid.shape, generator=gen).to(state.resid) * state.resid.std()
        for letter, jac in (("q", j_q), ("k", j_k)):
            path = _path(model, layer, letter)
            move, _ = _moves(path, state.resid, state.proj[letter], delta[None])
            if letter == "q":
                want = torch.einsum("bhte,bhtje->bhtj", move[0], jac)
            else:
                want = torch.einsum("bhje,bhtje->bhtj", move[0][:, group], jac)
            change = torch.einsum(
                "bpd,ned->bpne",
                path.norm(state.resid + delta).float() - path.norm(state.resid).float(),
                path.weight.float(),
            ).flatten(2)
            seen: dict[str, Tensor] = {}

            def read(x: Tensor, seen: dict[str, Tensor] = seen) -> None:
                seen["s"] = x.detach().float()

            hooks = [
                (model.qkv_out_hook(layer, letter), lambda x, c=change: x + c.to(x.dtype)),  # type: ignore[arg-type]
                (model.attn_scores_hook(layer), read),
            ]
            with torch.no_grad(), model.hooks(hooks):
                model(ids)
            if not _agree(seen["s"] - state.scores.detach().float(), want, state.pattern > 0, rtol):
                return (
                    f"layer {layer}'s {letter} does not reach the scores through its norm alone (a norm "
                    "after the rotary embedding?)"
                )
            # and a large move where the scores read q (k), past any norm, so that a soft cap shows
            leaf = state.leaf[letter].detach()
            push = torch.randn(leaf.shape, generator=gen).to(leaf) * 30 * leaf.std()
            heads = _head_major(push, jac.shape[1] if letter == "q" else spec.n_kv_heads).float()
            want = (
                torch.einsum("bhte,bhtje->bhtj", heads, jac)
                if letter == "q"
                else torch.einsum("bhje,bhtje->bhtj", heads[:, group], jac)
            )
            hooks = [
                (model.qk_score_input_hook(layer, letter), lambda x, p=push: x + p),  # type: ignore[arg-type]
                (model.attn_scores_hook(layer), read),
            ]
            with torch.no_grad(), model.hooks(hooks):
                model(ids)
            if not _agree(seen["s"] - state.scores.detach().float(), want, state.pattern > 0, rtol):
                return f"layer {layer}'s scores are not linear in {letter} (soft-capping?)"
    return None


def _agree(got: Tensor, want: Tensor, where: Tensor, rtol: float) -> bool:
    return float((got - want)[where].abs().max()) <= rtol * (float(want[where].abs().max()) + 1e-12)


def qk_corrections(
    model: HookedModel, graph: Graph, capture: QKCapture, delta: SourceOutputs, chunk: int = 16
) -> tuple[Tensor, list[tuple[int, slice, slice]]]:
    """Per backward pass, source, example and q/k destination: sum G . (dA_exact - dA_linear).

    Args:
        delta: [b, P, n_sources, d] ablated - clean source outputs (each chunk of sources is taken to the
            layer it reaches).
    Returns:
        corrections [n_passes, n_sources, b, n_destinations] (zero outside the q/k columns) and, per layer,
        (number of sources reaching it, its q destinations, its k destinations).
    """
    spec = graph.spec
    n_passes = len(capture.layers[0].grads)
    b = delta.shape[0]
    out = torch.zeros(n_passes, graph.n_sources, b, graph.n_destinations, device=model.device)
    prefix = graph.valid_prefixes()
    placed = []
    rep = spec.n_heads // spec.n_kv_heads
    group = torch.arange(spec.n_heads) // rep
    for layer, state in enumerate(capture.layers):
        assert state.scores is not None and state.pattern is not None and state.resid is not None
        j_q, j_k = score_jacobians(state, spec.n_heads, spec.n_kv_heads)
        q_cols, k_cols = graph.qkv_destinations(layer, "q"), graph.qkv_destinations(layer, "k")
        n_pre = prefix[q_cols.start]
        placed.append((n_pre, q_cols, k_cols))
        grads = torch.stack(state.grads) if state.grads else torch.zeros(n_passes, *state.pattern.shape)
        scores, pattern = state.scores.detach().float(), state.pattern.float()
        paths = {letter: _path(model, layer, letter) for letter in ("q", "k")}
        for start, stop in _chunks(delta, n_pre, chunk):
            d = delta.select(slice(start, stop)).to(state.resid.device).permute(2, 0, 1, 3).float()
            dq, dq_lin = _moves(paths["q"], state.resid, state.proj["q"], d)  # [c, b, H, P, e]
            ds = torch.einsum("cbhte,bhtje->cbhtj", dq, j_q)
            ds_lin = torch.einsum("cbhte,bhtje->cbhtj", dq_lin, j_q)
            change = _pattern_changes(scores, pattern, ds, ds_lin)
            out[:, start:stop, :, q_cols] = torch.einsum("cbhtj,nbhtj->ncbh", change, grads).to(out)
            dk, dk_lin = _moves(paths["k"], state.resid, state.proj["k"], d)  # [c, b, G, P, e]
            ds = torch.einsum("cbhje,bhtje->cbhtj", dk[:, :, group], j_k)
            ds_lin = torch.einsum("cbhje,bhtje->cbhtj", dk_lin[:, :, group], j_k)
            change = _pattern_changes(scores, pattern, ds, ds_lin)
            per_head = torch.einsum("cbhtj,nbhtj->ncbh", change, grads)
            per_kv_head = per_head.reshape(*per_head.shape[:3], spec.n_kv_heads, rep).sum(-1)
            out[:, start:stop, :, k_cols] = per_kv_head.to(out)
    return out, placed


def _chunks(delta: SourceOutputs, n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) ranges of at most `size` of the first `n` sources, none crossing a shard of `delta`."""
    return [
        (start, min(start + size, sources.stop, n))
        for sources, _ in delta.shards
        for start in range(sources.start, min(sources.stop, n), size)
    ]
