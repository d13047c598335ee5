"""How much memory an `attribute` call takes, and the settings that keep it within a budget.

The memory model (bytes; b pairs per batch, r rows per forward pass, P positions, L layers, H heads,
d = d_model, e = the model's bytes per element):

- weights: the model's parameters;
- source buffers: `k x n_sources x b x P x d x 4` (float32; k = 1 for eap / relp / atp* / eap-ig-inputs,
  2 for eap-ig-activations and exact, 3 for clean-corrupted), plus at edge level the gradient queue of
  the score matmuls, `(64 + H + 2 H_kv) x b x P x d x 4`;
- autograd, per row: every layer keeps about `e x (H x P^2 + P x (4 d + 6 d_mlp))` (one attention
  probability tensor per head, the projections and MLP activations) and the layer being differentiated
  adds about `7 e x H x P^2` of temporaries; with recomputation (`circuits.models.recompute`) one layer's
  activations and about `5 e x H x P^2` of temporaries are held at a time, plus each block's input;
- logits: `2 x r x d_vocab x 4`, times P unless the metric reads the last position only;
- the process itself (Python, torch): 0.5 GiB.

The estimate is of the process's peak resident memory. The constants are fitted to SmolLM2-135M, EAP-IG
(docs/benchmarks.md, "Memory against prompt length"): at 512 to 2048 tokens the model is within 10% of
the measured peak without recomputation, and from 25% under to 2% over it with recomputation. For a
model placed over several devices it is the sum over them (the source buffers are spread as the layers
are, `circuits.sources.source_placement`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from circuits.attribution.methods import MethodSpec
from circuits.attribution.options import ScoringOptions
from circuits.distributed import local_world_size
from circuits.errors import InputError
from circuits.graph import Graph
from circuits.models.hooked import HookedModel

GIB = 2**30
PROCESS_BYTES = GIB // 2  # Python, torch and the tokenizer


@dataclass(frozen=True)
class MemoryPlan:
    """Settings of one `attribute` call and the bytes the memory model expects it to take."""

    batch_size: int
    max_rows: int
    recompute: bool
    estimate: int

    def __str__(self) -> str:
        return (
            f"batch_size={self.batch_size}, max_rows={self.max_rows}, recompute={self.recompute} "
            f"(about {self.estimate / GIB:.2f} GiB)"
        )


def rows_per_pass(spec: MethodSpec, batch_size: int, max_rows: int, steps: int) -> int:
    """Rows of the largest forward pass a batch of `batch_size` pairs runs."""
    stacked = max(1, max_rows // batch_size)
    match spec.rows:
        case "clean and corrupted":
            return 2 * batch_size
        case "IG steps":
            return batch_size * min(steps, stacked)
        case "units":
            return batch_size * stacked
    return batch_size


def estimate_bytes(
    model: HookedModel, graph: Graph, options: ScoringOptions, n_positions: int, last_position: bool
) -> int:
    """The memory model above, in bytes, of an `attribute` call with `options` on prompts of `n_positions`
    tokens (`last_position`: the metric reads the last position only)."""
    s, P, b, spec = graph.spec, n_positions, options.batch_size, options.spec
    e = model.dtype.itemsize
    rows = rows_per_pass(spec, b, options.max_rows, options.ig_steps)
    weights = model.parameter_bytes
    per_source = b * P * s.d_model * 4
    buffers = spec.buffers * graph.n_sources * per_source
    if options.level == "edge" and spec.backward != "none":
        buffers += (64 + s.n_heads + 2 * s.n_kv_heads) * per_source
    attention = e * s.n_heads * P * P
    layer = attention + e * P * (4 * s.d_model + 6 * s.d_mlp)
    if spec.backward == "none":
        autograd = 7 * attention  # one layer's forward temporaries
    elif options.recompute:
        autograd = 2 * s.n_layers * e * P * s.d_model + layer + 5 * attention
    else:
        autograd = s.n_layers * layer + 7 * attention
    logits = 2 * model.d_vocab * 4 * (1 if last_position else P)
    return PROCESS_BYTES + weights + buffers + rows * (autograd + logits)


def plan_memory(
    model: HookedModel, graph: Graph, options: ScoringOptions, n_positions: int, last_position: bool
) -> MemoryPlan:
    """The largest settings (at most `options`') that the memory model fits within `options.max_memory`.

    Candidates in order: the given batch size and rows; fewer rows per pass (IG steps and patched
    copies run in more passes); recomputation of the blocks in the backward pass (one more forward pass
    each, which at long prompts costs little: memory traffic falls); fewer pairs per batch. Scores do not
    depend on any of these (sums in float64; recomputation is exact). Larger is not always faster: on
    CPUs one row per pass was as fast or faster in docs/benchmarks.md; pass `max_rows` to choose.
    """
    budget_gib, spec, steps = options.max_memory, options.spec, options.ig_steps
    if budget_gib is None or not budget_gib > 0:
        raise InputError(f"max_memory must be a positive number of GiB, got {budget_gib!r}")
    recomputes = (False, True) if spec.recomputable else (False,)
    candidates: list[MemoryPlan] = []
    for b in _halvings(options.batch_size):
        for recompute in recomputes:
            seen: set[int] = set()
            for rows in _halvings(options.max_rows):
                if rows_per_pass(spec, b, rows, steps) in seen:
                    continue  # the same passes as a larger setting
                seen.add(rows_per_pass(spec, b, rows, steps))
                settings = replace(options, batch_size=b, max_rows=rows, recompute=recompute)
                bytes_ = estimate_bytes(model, graph, settings, n_positions, last_position)
                plan = MemoryPlan(b, rows, recompute, bytes_)
                if bytes_ <= int(budget_gib * GIB):
                    return plan
                candidates.append(plan)
    smallest = min(candidates, key=lambda p: p.estimate)
    raise InputError(
        f"{spec.name} on {n_positions}-token prompts needs about {smallest.estimate / GIB:.2f} GiB even with "
        f"{smallest} (the model's weights alone are part of it); max_memory={budget_gib} GiB is below that. "
        "Raise max_memory, use shorter prompts, or a smaller model / dtype"
    )


FREE_SHARE = 0.6  # of the memory free when a call starts, what a call with no budget may take


def free_bytes(model: HookedModel) -> int | None:
    """Memory free on the model's device now: the GPU's free memory, or for the CPU the system's available
    memory (Linux: MemAvailable); None where it cannot be read (another device, or a model over several)."""
    import torch

    device = model.device
    if any(model.layer_device(layer) != device for layer in range(model.spec.n_layers)):
        return None
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_budget(model: HookedModel) -> float | None:
    """The budget in GiB of a call that names none: what the model already holds plus `FREE_SHARE` of
    the memory free now, shared among torchrun's processes on a CPU machine (None where that cannot be
    read: no budget then)."""
    free = free_bytes(model)
    if free is None:
        return None
    if model.device.type == "cpu":  # torchrun's processes on this machine share its memory
        free //= local_world_size()
    return (model.parameter_bytes + PROCESS_BYTES + FREE_SHARE * free) / GIB


def _halvings(n: int) -> list[int]:
    """n, n // 2, ..., 1."""
    out = [n]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out
