"""The API with the model on a non-CPU device (tests/virtual_device.py: CPU data behind a device that, as
CUDA, refuses to meet CPU tensors): every entry point runs without mixing devices and returns exactly the
CPU results. This is the CI stand-in for a GPU run; it checks placement, not CUDA itself.

With `CIRCUITS_TEST_DEVICE=cuda` (scripts/gpu_check.sh sets it) the same tests run on the real accelerator,
where other kernels give the CPU results to a tolerance in the largest value (`TOLERANCE`)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from circuits import Graph, attribute, load_model
from circuits.evaluation import evaluate_many
from circuits.evaluation.curves import mib_scores
from circuits.evaluation.refinement import refine
from circuits.models.hooked import HookedModel
from circuits.neurons import context_neurons, last_activations, neuron_ig, reweight
from circuits.sources import SourceOutputs, source_placement
from circuits.steering import contrastive_token_ig, steer, steering_vectors
from circuits.testing import tiny_gpt2_hf, tiny_llama_hf, tiny_tokenizer
from tests.pairs import PAIRS, make_pairs
from tests.virtual_device import OnDevice, device_under_test, real_device, split_over_devices, to_cpu

pytestmark = pytest.mark.slow  # about 50 s: every entry point twice, in two dtypes

REAL = real_device()  # None: the virtual device, where results are the CPU's bit for bit
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # on a real accelerator, of the largest value
PROMPTS = [clean for clean, *_ in PAIRS]
TARGETS = [answer for _, _, answer, _ in PAIRS]


def _scores(method: str, **options) -> Callable[[HookedModel], object]:
    def run(model: HookedModel) -> object:
        found = attribute(
            model, Graph.from_model(model), make_pairs(model), method=method, quiet=True, **options
        )
        return found.edge_scores if found.level == "edge" else found.node_scores

    return run


def _circuits(model: HookedModel) -> list[Graph]:
    graph = Graph.from_model(model)
    attribute(model, graph, make_pairs(model), method="eap", quiet=True)
    return [graph.top_n(5), graph.top_n(20)]


def _evaluations(ablation: str) -> Callable[[HookedModel], object]:
    def run(model: HookedModel) -> object:
        found = evaluate_many(model, _circuits(model), make_pairs(model), ablation=ablation)  # type: ignore[arg-type]
        full = found[0].full_per_example
        assert full is not None
        return torch.stack([*(e.per_example for e in found), full])

    return run


def _mib(model: HookedModel) -> object:
    graph = Graph.from_model(model)
    attribute(model, graph, make_pairs(model), method="eap", quiet=True)
    found = mib_scores(model, graph, make_pairs(model), quiet=True)
    return torch.tensor([found.cpr, found.cmd])


def _refined(model: HookedModel) -> object:
    return refine(model, _circuits(model)[0], make_pairs(model), budget=8, rounds=2).in_graph


def _neurons(ircan_baseline: bool = False, **options) -> Callable[[HookedModel], object]:
    def run(model: HookedModel) -> object:
        baseline = last_activations(model, PROMPTS) if ircan_baseline else "zero"
        found = neuron_ig(model, PROMPTS, TARGETS, baseline=baseline, steps=4, quiet=True, **options)
        return torch.cat([found.scores.flatten(), found.prob_delta.flatten()])

    return run


def _context_neurons(model: HookedModel) -> object:
    without = ["John gave a drink to", "Bob gave a drink to", "said hello to"]
    return context_neurons(model, PROMPTS, without, TARGETS, steps=3, quiet=True).top(3)


def _token_ig(quadrature: str) -> Callable[[HookedModel], object]:
    def run(model: HookedModel) -> object:
        return contrastive_token_ig(
            model, PAIRS[0][0], " Mary", " John", steps=5, quadrature=quadrature
        ).scores

    return run


def _steered(model: HookedModel) -> object:
    fit = [(PROMPTS[0], " Mary", " John"), (PROMPTS[1], " Alice", " Bob")]
    vectors = steering_vectors(model, fit, [0, 1], k=1, steps=3, quiet=True)
    ids = torch.tensor(model.to_ids(PROMPTS[:1]), device=model.device)
    with torch.no_grad(), steer(model, vectors, 4.0, layers=[1]):
        return model(ids)


def _reweighted(model: HookedModel) -> object:
    ids = torch.tensor(model.to_ids(PROMPTS[:1]), device=model.device)
    with torch.no_grad(), reweight(model, torch.tensor([[0, 3], [1, 5]]), 2.0):
        return model(ids)


CASES: dict[str, Callable[[HookedModel], object]] = {
    "eap": _scores("eap"),
    "eap-ig-inputs": _scores("eap-ig-inputs"),
    "eap-ig-activations": _scores("eap-ig-activations"),
    "clean-corrupted": _scores("clean-corrupted"),
    "relp": _scores("relp"),
    "eap-ig-inputs, recomputed blocks, 1 row per pass": _scores("eap-ig-inputs", recompute=True, max_rows=1),
    "exact, node level": _scores("exact", level="node"),
    "exact, edge level": _scores("exact"),
    "evaluate_many, patching": _evaluations("patching"),
    "evaluate_many, mean": _evaluations("mean"),
    "mib_scores": _mib,
    "refine": _refined,
    "neuron_ig": _neurons(),
    "neuron_ig, full sequences": _neurons(implementation="full"),
    "neuron_ig, IRCAN baseline, IDGI": _neurons(ircan_baseline=True, quadrature="idgi"),
    "context_neurons": _context_neurons,
    "contrastive_token_ig": _token_ig("gauss-legendre"),
    "contrastive_token_ig, IDGI": _token_ig("idgi"),
    "steer": _steered,
    "reweight": _reweighted,
}


def _on_both(
    build: Callable,
    case: Callable[[HookedModel], object],
    move_after_boot: bool = False,
    dtype: torch.dtype = torch.float32,
    split: bool = False,
) -> tuple[object, object]:
    """The case's result with the model on the CPU and on the virtual device, or with `split` over both
    (`split_over_devices`). TransformerLens refuses to split a fused QKV projection (GPT-2) whose weights
    report the meta device, so such a model is moved after the bridge is built (what
    `load_model(device=...)` does before it, `.to` does after)."""
    want = case(load_model(build(), tiny_tokenizer(), dtype=dtype))
    with device_under_test() as device:
        if split:
            model = load_model(build(), tiny_tokenizer(), dtype=dtype)
            split_over_devices(model, device)
            assert {p.device.type for p in model.bridge.parameters()} == {"cpu", device.type}
            return want, to_cpu(case(model))
        if move_after_boot:
            model = load_model(build(), tiny_tokenizer(), dtype=dtype)
            model.bridge.to(device)
        else:
            model = load_model(build(), tiny_tokenizer(), device=device, dtype=dtype)
        assert model.device == device
        got = case(model)
    return want, to_cpu(got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_every_entry_point_runs_on_another_device_with_the_cpu_results(name, dtype):
    want, got = _on_both(tiny_llama_hf, CASES[name], dtype=dtype)
    _same_as_on_the_cpu(got, want, 0.0)


@pytest.mark.parametrize("name", ["eap-ig-inputs", "exact, node level", "evaluate_many, patching"])
def test_gpt2_layout_runs_on_another_device(name):
    want, got = _on_both(tiny_gpt2_hf, CASES[name], move_after_boot=True)
    _same_as_on_the_cpu(got, want, 0.0)


def _same_as_on_the_cpu(got: object, want: object, virtual_tolerance: float) -> None:
    """A CPU tensor equal to the CPU run's: to `virtual_tolerance` of its largest value on the virtual
    device, to `TOLERANCE` of its dtype on a real one; non-float results (circuits, indices) exactly."""
    assert isinstance(got, torch.Tensor) and got.device.type == "cpu" and isinstance(want, torch.Tensor)
    tolerance = virtual_tolerance if REAL is None else TOLERANCE[want.dtype]
    if not want.is_floating_point() or tolerance == 0:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * float(want.abs().max()))


def _same_as_on_one_device(name: str, got: object, want: object) -> None:
    """Bit for bit on the virtual device, except gradient scores: their source outputs are kept per device,
    so each score matmul is split by rows, which changes the float32 summation order (a few ulps)."""
    split_matmuls = name.startswith(("eap", "clean-corrupted", "relp"))
    _same_as_on_the_cpu(got, want, 1e-5 if split_matmuls else 0.0)


@pytest.mark.parametrize("name", list(CASES))
def test_every_entry_point_runs_on_a_model_split_over_two_devices(name):
    """Layers on two devices, as a device map places them: outputs, gradients and scores cross between
    them (this found q/k/v gradients queued in the wrong order on another device than their layer)."""
    want, got = _on_both(tiny_llama_hf, CASES[name], split=True)
    _same_as_on_one_device(name, got, want)


@pytest.mark.parametrize("name", ["eap-ig-inputs", "exact, edge level", "evaluate_many, patching"])
def test_gpt2_layout_runs_split_over_two_devices(name):
    want, got = _on_both(tiny_gpt2_hf, CASES[name], split=True)
    _same_as_on_one_device(name, got, want)


@pytest.mark.parametrize(
    "name",
    [
        "eap",
        "eap-ig-inputs",
        "eap-ig-activations",
        "clean-corrupted",
        "exact, edge level",
        "exact, node level",
        "evaluate_many, patching",
        "refine",
    ],
)
def test_source_outputs_are_kept_beside_the_layers_that_write_them(name, monkeypatch):
    """On a model split over two devices, every source-output buffer that attribution, evaluation and
    refinement make is in two shards: the input's and the first half's sources on the CPU, the second
    half's on the other device."""
    made: list[SourceOutputs] = []
    empty = SourceOutputs.empty

    def recording(*args: object) -> SourceOutputs:
        made.append(empty(*args))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(SourceOutputs, "empty", staticmethod(recording))
    with device_under_test() as device:
        model = load_model(tiny_llama_hf(), tiny_tokenizer())
        split_over_devices(model, device)
        graph = Graph.from_model(model)
        first_on_device = graph.head_sources(model.spec.n_layers // 2).start
        cpu = torch.device("cpu")
        assert source_placement(model, graph) == [
            (slice(0, first_on_device), cpu),
            (slice(first_on_device, graph.n_sources), device),
        ]
        CASES[name](model)
    assert made
    for outputs in made:
        assert [(sources, t.device) for sources, t in outputs.shards] == source_placement(model, graph)
        assert outputs.shape[2] == graph.n_sources
        assert REAL is not None or isinstance(outputs.shards[1][1], OnDevice)  # the other device's data


def test_the_virtual_device_refuses_cpu_tensors_as_cuda_does():
    with device_under_test() as device:
        x = torch.ones(3, device=device)
        assert x.device == device and torch.equal(to_cpu(x * torch.tensor(2.0)), torch.full((3,), 2.0))
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(3)
        assert torch.equal(to_cpu(x[torch.tensor([0, 2])]), torch.ones(2))  # CPU indices are allowed


def test_cli_discover_on_another_device_writes_the_cpu_files(tmp_path):
    import json

    from circuits.cli import main

    args = ["discover", "--model", "tiny-llama", "--n", "4", "--batch-size", "2", "--edges", "30"]
    args += ["--resamples", "50", "--stability", "2"]
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    with device_under_test() as device:
        assert main([*args, "--device", str(device), "--out", str(tmp_path / "device")]) == 0
    cpu, moved = (torch.load(tmp_path / name / "scores.pt") for name in ("cpu", "device"))
    assert cpu.keys() == moved.keys()
    for key, value in cpu.items():
        if isinstance(value, torch.Tensor):
            _same_as_on_the_cpu(moved[key], value, 0.0)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("cpu", "device")]
    for summary in summaries:
        summary.pop("seconds")
    if REAL is None:  # on a real device, faithfulness and intervals differ in their last digits
        assert summaries[0] == summaries[1]
    assert summaries[0].keys() == summaries[1].keys()
