"""A stand-in accelerator for CPU-only machines: tensors that report the device `meta` but hold real CPU
data, and that refuse, as CUDA does, to meet a CPU tensor in one operation (0-dim CPU tensors and CPU index
tensors excepted, as on CUDA). Running the API with the model on this device checks on every CI run that
no code path mixes the model's device with tensors left on the CPU, which is how GPU runs fail first.

It checks placement only: no CUDA kernels, streams, NCCL or memory limits. `meta` is used because it is the
one non-CPU device a CPU-only torch build has a device guard for (autograd needs one). Inside
`on_virtual_device()`, `torch.Tensor.to` and the tensor factories (patched at the Python level, so that
autograd's worker threads see them too) move to and create on it; `torch.vmap` over these tensors is not
supported (AtP*'s batched Jacobians use it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

from circuits.models.hooked import HookedModel

DEVICE = torch.device("meta")
REAL_DEVICE_VARIABLE = "CIRCUITS_TEST_DEVICE"  # e.g. "cuda": the same tests on a real accelerator
FACTORIES = (
    "zeros",
    "ones",
    "full",
    "empty",
    "arange",
    "tensor",
    "eye",
    "linspace",
    "randn",
    "rand",
    "randint",
    "randperm",
    "as_tensor",
    "scalar_tensor",
)
INDEXING = {  # CUDA takes CPU index tensors (moving them): their second argument is not checked
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}
MOVES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def _on_device(device: Any) -> bool:
    return isinstance(device, str | torch.device) and torch.device(device).type == DEVICE.type


class OnDevice(torch.Tensor):
    """A CPU tensor `elem` that reports `DEVICE`; every operation runs on `elem`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnDevice:
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=DEVICE,
            requires_grad=elem.requires_grad,
        )
        wrapper.elem = elem
        return wrapper

    def __repr__(self) -> str:  # type: ignore[override]
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        checked = ([a for i, a in enumerate(args) if i != 1], kwargs) if func in INDEXING else (args, kwargs)
        strays = [
            a
            for a in tree_leaves(checked)
            if isinstance(a, torch.Tensor) and not isinstance(a, OnDevice) and a.dim() > 0
        ]
        if strays and func not in MOVES:
            raise RuntimeError(
                f"Expected all tensors to be on the same device (virtual device): {func} got a "
                f"{strays[0].device} tensor of shape {tuple(strays[0].shape)}"
            )
        to_cpu = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        if _on_device(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")

        def unwrap(a: Any) -> Any:
            return a.elem if isinstance(a, OnDevice) else a

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func is torch.ops.aten.copy_.default and isinstance(args[0], OnDevice):
            return args[0]
        if to_cpu:
            return out
        return tree_map(lambda o: OnDevice(o) if type(o) is torch.Tensor else o, out)


class _Move(torch.autograd.Function):
    """A CPU tensor moved onto the virtual device; its gradient flows back to the CPU tensor."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return OnDevice(x.detach())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.elem if isinstance(grad, OnDevice) else grad


class _Leave(torch.autograd.Function):
    """A virtual-device tensor moved to the CPU; its gradient flows back onto the virtual device (autograd's
    own backward of the move would make a data-less meta tensor)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.elem.clone() if isinstance(x, OnDevice) else x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad if isinstance(grad, OnDevice) else OnDevice(grad)


def _factory(make: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _on_device(kwargs.get("device")):
            return OnDevice(make(*args, **(kwargs | {"device": "cpu"})))
        return make(*args, **kwargs)

    return factory


def _to(to: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def move(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(self, OnDevice):  # through the dispatcher, so that autograd records it
            leaving = [a for a in [*args, kwargs.get("device")] if isinstance(a, str | torch.device)]
            if self.requires_grad and leaving and torch.device(leaving[0]).type == "cpu":
                return _Leave.apply(self).to(*args, **kwargs)
            return to(self, *args, **kwargs)
        target, rest = kwargs.get("device"), list(args)
        for i, a in enumerate(rest):
            if isinstance(a, str | torch.device):
                target = a
                rest[i] = "cpu" if _on_device(a) else a
            elif isinstance(a, OnDevice):  # .to(other): other's device and dtype
                target, rest[i] = DEVICE, a.elem
        if not _on_device(target):
            return to(self, *args, **kwargs)
        out = to(self, *rest, **(kwargs | {"device": "cpu"} if "device" in kwargs else kwargs))
        return _Move.apply(out) if out.requires_grad else OnDevice(out)

    return move


def _where(where: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """torch.where(cond, x, number) wraps the number on cond's device, where its value would be lost:
    wrap it on the CPU instead (a 0-dim CPU tensor, as CUDA allows)."""

    def choose(*args: Any, **kwargs: Any) -> torch.Tensor:
        if len(args) == 3 and any(isinstance(a, OnDevice) for a in args):
            dtypes = [a.dtype for a in args[1:] if isinstance(a, torch.Tensor)]
            dtype = dtypes[0] if dtypes else torch.get_default_dtype()
            args = tuple(torch.tensor(a, dtype=dtype) if isinstance(a, int | float) else a for a in args)
        return where(*args, **kwargs)

    return choose


@contextlib.contextmanager
def on_virtual_device() -> Iterator[torch.device]:
    """Within the block, `DEVICE` is the virtual device: pass it as `load_model(..., device=...)`."""
    saved = {name: getattr(torch, name) for name in (*FACTORIES, "where")}
    saved_to = torch.Tensor.to
    try:
        for name in FACTORIES:
            setattr(torch, name, _factory(saved[name]))
        torch.where = _where(saved["where"])  # type: ignore[assignment]
        torch.Tensor.to = _to(saved_to)  # type: ignore[method-assign]
        yield DEVICE
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        torch.Tensor.to = saved_to  # type: ignore[method-assign]


def real_device() -> torch.device | None:
    """The accelerator named by `CIRCUITS_TEST_DEVICE` (scripts/gpu_check.sh sets it), or None."""
    name = os.environ.get(REAL_DEVICE_VARIABLE)
    return torch.device(name) if name else None


@contextlib.contextmanager
def device_under_test() -> Iterator[torch.device]:
    """The real accelerator where `CIRCUITS_TEST_DEVICE` names one, else the virtual device."""
    real = real_device()
    if real is not None:
        yield real
        return
    with on_virtual_device() as device:
        yield device


def to_cpu(x: Any) -> Any:
    """Results with the virtual or real device's tensors as plain CPU tensors."""

    def cpu(a: Any) -> Any:
        if isinstance(a, OnDevice):
            return a.elem
        return a.cpu() if isinstance(a, torch.Tensor) else a

    return tree_map(cpu, x)


def split_over_devices(model: HookedModel, device: torch.device = DEVICE) -> None:
    """Place the second half of `model`'s blocks, its final norm and its unembedding on the virtual device,
    the rest on the CPU, as accelerate's `dispatch_model` does for a `device_map` over two GPUs: each
    placed Hugging Face module gets a pre-hook moving its inputs to its device, and the model records the
    map in `hf_device_map`. Call inside `device_under_test()` with the device it yields."""
    bridge = model.bridge
    n = len(bridge.blocks)
    mapping = bridge.adapter.component_mapping
    placed = {f"{mapping['blocks'].name}.{i}": bridge.blocks[i] for i in range(n)}
    placed |= {mapping[name].name: getattr(bridge, name) for name in ("ln_final", "unembed")}
    device_map = {mapping["embed"].name: "cpu"}
    for i, (name, component) in enumerate(placed.items()):
        placement = device if i >= n // 2 else torch.device("cpu")
        device_map[name] = str(placement)
        component.to(placement)
        component.original_component.register_forward_pre_hook(_inputs_to(placement), with_kwargs=True)
    bridge.original_model.hf_device_map = device_map


def _inputs_to(device: torch.device) -> Callable[..., tuple[Any, Any]]:
    def hook(module: torch.nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
        def move(a: Any) -> Any:
            return a.to(device) if isinstance(a, torch.Tensor) else a

        return tree_map(move, args), tree_map(move, kwargs)

    return hook
