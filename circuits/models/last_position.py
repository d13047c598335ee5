"""One-position passes over a cached prefix, each row joining the layer stack after its own layer.

Neuron IG moves one layer's neuron activations at the prompt's last position and leaves every earlier
position as it is (causal attention). So the prompts are run once (`run_prompts`), keeping the prefix's keys
and values and each decoder block's output at the last position, and the exact arguments the model passes
to each block for that position are recorded by a pass whose blocks only record (`_block_calls`). A row that
moves layer l's neurons then joins after block l: the block's recorded output plus what the moved neurons
add through the down projection. It runs only blocks l+1.., forward and backward: on average half the
layers. Several prompts share each pass (rows kept prompt-major), so the weights are read and the
per-operation costs paid once for all of them.

The blocks are called as the model itself calls them (recorded arguments), with one change: their attention
is `prefix_attention`, which takes the row's own key and value plus its prompt's cached prefix (one matrix
product per prompt and key/value head, no per-row copies of the prefix, no gradient computed for it). The
output head is the bridge adapter's final norm and unembedding. `LastPositions.check` tests the route on
the top block against the model itself: block output, the additivity of the down projection, logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, Cache

from circuits.models.hooked import HookedModel
from circuits.models.plain import down_projections, plain_model, plain_submodule


class Replace:
    """Pre-hooks on the down projections: at layer l, rows `index` get `values` at the last position.

    Also records each projection's input at the last position, or at `recorded_at` (the layer's neuron
    activations).
    """

    def __init__(self, projections: list[nn.Module], recorded_at: Tensor | None = None) -> None:
        self.projections = projections
        self.patches: dict[int, tuple[Tensor, Tensor]] = {}
        self.recorded: dict[int, Tensor] = {}
        self.recorded_at = recorded_at  # [rows] positions to record (default: the last one)

    def hook(self, layer: int) -> Callable[[nn.Module, tuple], tuple | None]:
        def pre(_module: nn.Module, args: tuple) -> tuple | None:
            (x,) = args
            self.recorded[layer] = _at(x, self.recorded_at).detach()
            if layer not in self.patches:
                return None
            index, values = self.patches[layer]
            last = x[:, -1].index_copy(0, index.to(x.device), values.to(x.device, x.dtype))
            return (torch.cat([x[:, :-1], last[:, None]], dim=1),)

        return pre

    def __enter__(self) -> Replace:
        self.handles = [p.register_forward_pre_hook(self.hook(i)) for i, p in enumerate(self.projections)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class LastPositions:
    """Prompts' last positions, run once over their cached prefixes, and the blocks' recorded calls."""

    model: HookedModel
    run: PromptRun
    calls: list[tuple[tuple, dict[str, Any]]]  # per block, the arguments after the hidden states

    @classmethod
    def of(cls, model: HookedModel, prompts: list[list[int]]) -> LastPositions:
        AttentionInterface.register(PREFIX_ROWS, prefix_attention)  # the name `_block` runs the blocks with
        return cls(model, run_prompts(model, prompts), _block_calls(model, prompts))

    def run_rows(self, layers: list[int], leaf: Tensor) -> Tensor:
        """Logits [prompts, groups, points, d_vocab] with layer `layers[g]`'s neurons set to leaf[:, g].

        leaf: [prompts, groups, points, d_mlp], `layers` increasing. The rows of group g join after block
        layers[g]: its recorded output plus the change the moved neurons make through the down projection
        (the block adds the projection's output to the residual stream; `check` tests this). Gradients reach
        the leaf through the blocks above only.
        """
        n_prompts, _, points, _ = leaf.shape
        d_model = self.run.block_outputs[0].shape[-1]
        projections = down_projections(plain_model(self.model, PREFIX_ROWS))
        hidden = self.run.block_outputs[0].new_zeros(n_prompts, 0, d_model)  # prompt-major rows
        for j in range(layers[0], len(self.calls)):
            if hidden.shape[1]:
                hidden = self._block(j, hidden)
            if j in layers:
                down = projections[j]
                device = _device_of(down)  # the layer's, when the model is spread over devices
                moved = (
                    leaf[:, layers.index(j)].contiguous().to(device, hidden.dtype)
                )  # [prompts, points, d_mlp]
                clean = self.run.activations[:, j, None].to(device, hidden.dtype).contiguous()
                joining = self.run.block_outputs[j] + (down(moved) - down(clean))
                hidden = torch.cat([hidden, joining], dim=1)
        return self.head(hidden).unflatten(1, (len(layers), points))

    def head(self, hidden: Tensor) -> Tensor:
        """[..., d_model] last block outputs -> [..., d_vocab] logits (final norm, unembedding), on the
        model's device."""
        logits = plain_submodule(self.model, "unembed")(plain_submodule(self.model, "ln_final")(hidden))
        return logits.to(self.model.device)

    def check(self) -> None:
        """Rows through the top block reproduce the model: its clean output and the logits (with
        `prefix_attention`), and the residual change when its neurons are moved (here halved)."""
        top = len(self.calls) - 1
        n_prompts = self.run.top_input.shape[0]
        projections = down_projections(plain_model(self.model, PREFIX_ROWS))
        clean = self.run.activations[:, top].to(_device_of(projections[top]), self.run.top_input.dtype)
        clean = clean.contiguous()
        halved = clean / 2
        with torch.no_grad():
            with Replace(projections) as replace:
                replace.patches[top] = (torch.arange(n_prompts, device=halved.device) * 2 + 1, halved)
                out = self._block(top, self.run.top_input.expand(-1, 2, -1))  # rows: clean, halved
            down = projections[top]
            expected = self.run.block_outputs[top][:, 0] + down(halved) - down(clean)
            logits = self.head(out[:, 0]).float()
        tol = max(1e-4, 4 * torch.finfo(out.dtype).eps)  # the model's own precision, at least 1e-4
        scale = float(self.run.block_outputs[top].abs().max())
        same_block = torch.allclose(out[:, 0], self.run.block_outputs[top][:, 0], rtol=tol, atol=tol * scale)
        additive = torch.allclose(out[:, 1], expected, rtol=tol, atol=tol * scale)
        same_logits = torch.allclose(
            logits, self.run.logits, rtol=tol, atol=tol * float(self.run.logits.abs().max())
        )
        if not (same_block and additive and same_logits):
            raise RuntimeError(
                f"{self.model.spec.name}: one-position rows do not reproduce the model for this architecture "
                f"(block {same_block}, MLP output added to the residual {additive}, logits {same_logits}); "
                "use implementation='full'"
            )

    def _block(self, j: int, hidden: Tensor) -> Tensor:
        """Block j on rows [prompts, rows per prompt, d_model] at the last position -> same shape."""
        n_prompts, per_prompt, d_model = hidden.shape
        args, kwargs = _per_row(self.calls[j], n_prompts, per_prompt)
        block = plain_submodule(self.model, "blocks", PREFIX_ROWS)[j]
        prefix = (self.run.keys[j], self.run.values[j], self.run.prefix_valid)
        out = block(hidden.reshape(-1, 1, d_model), *args, **kwargs, prefix=prefix)
        return (out[0] if isinstance(out, tuple) else out).reshape(n_prompts, per_prompt, d_model)


def prefix_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,  # noqa: ARG001 (Hugging Face's attention-function signature)
    scaling: float,
    dropout: float = 0.0,  # noqa: ARG001
    prefix: tuple[Tensor, Tensor, Tensor] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention of one-position rows over their prompt's cached prefix plus their own key and value.

    query [rows, heads, 1, d_head]; key, value [rows, kv_heads, 1, d_head] (the row's own position), rows
    prompt-major; prefix: keys and values [prompts, kv_heads, n_prefix, d_head] and which prefix positions
    are real [prompts, n_prefix]. Returns [rows, 1, heads, d_head] as Hugging Face attention functions do.
    The last position sees its whole prefix, so `attention_mask` has nothing to add.
    """
    if prefix is None:
        raise RuntimeError(f"{type(module).__name__} does not pass its keyword arguments to its attention")
    prefix_keys, prefix_values, valid = prefix
    unsupported = [k for k in ("softcap", "s_aux") if kwargs.get(k) is not None]
    window = kwargs.get("sliding_window")
    if window is not None and prefix_keys.shape[2] + 1 > window:
        unsupported.append("sliding_window shorter than the prompt")
    if unsupported or query.shape[2] != 1:
        raise RuntimeError(f"prefix_attention does not handle {unsupported or 'several query positions'}")
    rows, heads, _, d_head = query.shape
    n_prompts, kv_heads = prefix_keys.shape[:2]
    shape = (n_prompts, rows // n_prompts, kv_heads, heads // kv_heads, d_head)
    q = query.reshape(shape) * scaling
    own = (q * key.reshape(*shape[:3], 1, d_head)).sum(-1, keepdim=True)  # [p, n, kv, group, 1]
    scores = torch.einsum("pnkgd,pktd->pnkgt", q, prefix_keys)
    scores = scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    weights = torch.cat([scores, own], -1).softmax(-1)
    out = torch.einsum("pnkgt,pktd->pnkgd", weights[..., :-1], prefix_values)
    out = out + weights[..., -1:] * value.reshape(*shape[:3], 1, d_head)
    return out.reshape(rows, 1, heads, d_head), None


PREFIX_ROWS = "circuits_prefix_rows"  # registered with Hugging Face's attention functions on first use


@dataclass
class PromptRun:
    """What one no-gradient pass over (right-padded) prompts leaves: the prefixes' caches and the states
    at each prompt's last position."""

    keys: list[Tensor]  # per layer [prompts, kv_heads, n_prefix, d_head]; past a prompt's prefix: padding
    values: list[Tensor]
    prefix_valid: Tensor  # [prompts, n_prefix] bool, True on each prompt's own prefix
    block_outputs: list[Tensor]  # per block [prompts, 1, d_model]
    top_input: Tensor  # [prompts, 1, d_model] the last block's input
    activations: Tensor  # [prompts, n_layers, d_mlp] float32
    logits: Tensor  # [prompts, d_vocab] float32


def run_prompts(model: HookedModel, prompts: list[list[int]]) -> PromptRun:
    """One pass over the prompts, padded on the right (causal attention: the padding never reaches them)."""
    plain = plain_model(model)
    blocks = plain_submodule(model, "blocks")
    device = model.device
    lengths = torch.tensor([len(ids) for ids in prompts], device=device)
    last = lengths - 1
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for p, prompt in enumerate(prompts):
        ids[p, : len(prompt)] = torch.tensor(prompt, device=device)
    mask = (torch.arange(ids.shape[1], device=device) < lengths[:, None]).long()
    outputs: list[Tensor] = []
    inputs: list[Tensor] = []

    def record_input(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        inputs.append(_at(args[0] if args else kwargs["hidden_states"], last)[:, None].detach())

    def record_output(_module: nn.Module, _args: tuple, out: Any) -> None:
        outputs.append(_at(out[0] if isinstance(out, tuple) else out, last)[:, None].detach())

    kept = torch.unique(last)  # unembed only the positions some prompt ends at
    with torch.no_grad():
        handles = [b.register_forward_hook(record_output) for b in blocks]
        handles.append(blocks[-1].register_forward_pre_hook(record_input, with_kwargs=True))
        try:
            with Replace(down_projections(plain), recorded_at=last) as replace:
                out = plain(ids, attention_mask=mask, use_cache=True, logits_to_keep=kept)
        finally:
            for h in handles:
                h.remove()
    cache = out.past_key_values.layers
    n_prefix = ids.shape[1] - 1
    logits = out.logits[torch.arange(len(prompts), device=device), torch.searchsorted(kept, last)]
    return PromptRun(
        [layer.keys[:, :, :n_prefix] for layer in cache],
        [layer.values[:, :, :n_prefix] for layer in cache],
        torch.arange(n_prefix, device=device) < last[:, None],
        outputs,
        inputs[0],
        torch.stack([replace.recorded[j].to(device) for j in range(len(blocks))], dim=1).float(),
        logits.float().to(device),
    )


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _at(x: Tensor, positions: Tensor | None) -> Tensor:
    """x [rows, pos, ...] at each row's position ([rows, ...]); the last position when None."""
    if positions is None:
        return x[:, -1]
    return x[torch.arange(x.shape[0], device=x.device), positions]


def _block_calls(model: HookedModel, prompts: list[list[int]]) -> list[tuple[tuple, dict[str, Any]]]:
    """The arguments (after the hidden states) the model gives each block at the prompts' last positions.

    Found by one pass of the base model over the last tokens (batch of prompts, their positions given)
    whose blocks, replaced by stubs, only record what they are given and pass the hidden states on: no
    block computation (only the final norm runs). Cache arguments are dropped (`prefix_attention` brings
    the prefix).
    """
    blocks = plain_submodule(model, "blocks")
    calls: list[tuple[tuple, dict[str, Any]]] = []

    def stub(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        args = tuple(None if isinstance(a, Cache) else a for a in args[1:])
        calls.append((args, {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}))
        return hidden

    ids = torch.tensor([[p[-1]] for p in prompts], device=model.device)
    positions = torch.tensor([[len(p) - 1] for p in prompts], device=model.device)
    for block in blocks:
        block.forward = stub
    try:
        with torch.no_grad():
            plain_model(model).base_model(ids, position_ids=positions, use_cache=False)
    finally:
        for block in blocks:
            del block.forward
    if len(calls) != len(blocks):
        raise RuntimeError(f"{model.spec.name}: the model called {len(calls)} of its {len(blocks)} blocks")
    return calls


def _per_row(call: tuple[tuple, dict[str, Any]], n_prompts: int, per_prompt: int) -> tuple[tuple, dict]:
    """A recorded block call made for `per_prompt` prompt-major rows of each prompt.

    Tensors recorded with one entry per prompt along their first axis (position embeddings, position ids)
    are repeated per row; the rest is passed as recorded.
    """

    def expand(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return type(value)(expand(v) for v in value)
        if isinstance(value, Tensor) and n_prompts > 1 and value.dim() > 0 and value.shape[0] == n_prompts:
            return value.repeat_interleave(per_prompt, dim=0)
        return value

    args, kwargs = call
    return expand(args), {k: expand(v) for k, v in kwargs.items()}
