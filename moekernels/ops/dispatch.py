"""Backend selection (DESIGN.md section 4).

Every op is called with ``backend="auto" | "eager" | "cpu" | "triton" | "cuda"``. Each backend answers
``not_supported_reasons(spec, tensors)``: an empty list means it can run these inputs. ``auto`` picks, for CUDA
tensors, the op's preferred GPU backends in order (then eager); for CPU tensors, the compiled C++ kernel (then
eager). Forcing a backend that cannot run raises :class:`BackendUnavailableError` listing the reasons.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from moekernels import _extension

BACKENDS = ("eager", "cpu", "triton", "cuda")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the given inputs; the message lists every reason."""


@dataclass(frozen=True)
class OpSpec:
    """What an op supports per backend.

    dtypes: backend -> dtypes it accepts. cuda_order: which GPU backends ``auto`` tries first, fastest first
    (from the benchmarks). kernel: the compiled op (``torch.ops.moekernels.<kernel>``) the cpu/cuda backends
    call, checked for a CPU/CUDA implementation in the loaded build. triton_module: the module under
    ``moekernels.ops.triton`` holding the op's Triton kernels. extra_check(backend, tensors) -> more reasons.
    """

    name: str
    dtypes: Mapping[str, Sequence[torch.dtype]]
    cuda_order: Sequence[str] = ("cuda", "triton")
    kernel: str | None = None
    triton_module: str | None = None
    extra_check: Callable[[str, Mapping[str, torch.Tensor]], list] | None = None
    backends: Sequence[str] = field(default=BACKENDS)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        return f"triton is not importable ({type(e).__name__}: {e}); `pip install triton`"
    return None


def environment_reasons(backend: str) -> list[str]:
    """Why ``backend`` cannot run at all in this environment (independent of the inputs)."""
    if backend == "eager":
        return []
    if backend == "cpu":
        return [] if _extension.available() else [f"compiled extension moekernels._C is unavailable: {_extension.load_error}"]
    if backend == "cuda":
        if not _extension.available():
            return [f"compiled extension moekernels._C is unavailable: {_extension.load_error}"]
        reasons = []
        if not _extension.has_cuda_kernels():
            reasons.append("moekernels._C was built without CUDA kernels (torch without CUDA, or no nvcc at build time)")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device is available")
        return reasons
    if backend == "triton":
        err = triton_import_error()
        if err:
            return [err]
        if not torch.cuda.is_available() and not triton_interpret():
            return ["no CUDA device is available (set TRITON_INTERPRET=1 before importing moekernels to run Triton on the CPU)"]
        return []
    raise ValueError(f"backend must be one of 'auto', {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")


def not_supported_reasons(spec: OpSpec, backend: str, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Readable reasons why ``backend`` cannot run ``spec`` on ``tensors`` (empty list: it can)."""
    if backend not in spec.backends:
        return [f"{spec.name} has no {backend!r} implementation"]
    reasons = environment_reasons(backend)
    devices = {t.device.type for t in tensors.values()}
    if backend == "cpu" and devices != {"cpu"}:
        reasons.append(f"the cpu backend needs CPU tensors, got {sorted(devices)}")
    if backend == "cuda" and devices != {"cuda"}:
        reasons.append(f"the cuda backend needs CUDA tensors, got {sorted(devices)}")
    if backend == "triton" and devices != {"cuda"} and not (devices == {"cpu"} and triton_interpret()):
        reasons.append(f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {sorted(devices)}")
    ok = tuple(spec.dtypes.get(backend, FLOAT_DTYPES))
    bad = sorted({str(t.dtype) for t in tensors.values() if t.is_floating_point() and t.dtype not in ok})
    if bad:
        reasons.append(f"the {backend} backend supports dtypes {[str(d) for d in ok]}, got {bad}")
    if backend in ("cpu", "cuda") and spec.kernel and _extension.available() and not has_kernel(spec.kernel, backend):
        reasons.append(f"moekernels._C has no {backend.upper()} kernel for {spec.kernel} (an older build? rebuild: "
                       "`pip install --no-build-isolation -e .`)")
    if backend == "triton" and spec.triton_module and not triton_import_error():
        import importlib.util

        if importlib.util.find_spec(f"moekernels.ops.triton.{spec.triton_module}") is None:
            reasons.append(f"moekernels.ops.triton.{spec.triton_module} is missing from this installation")
    if spec.extra_check is not None:
        reasons.extend(spec.extra_check(backend, tensors))
    return reasons


def check_float_tensors(op: str, named: Mapping[str, object]) -> None:
    """ValueError naming the argument unless every value is a floating-point tensor on the device and of the dtype
    of the first one (``None`` values, i.e. optional arguments left out, are skipped)."""
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if t.dtype != first.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}")


def has_kernel(op: str, backend: str) -> bool:
    """Whether the loaded extension registers ``moekernels::<op>`` for ``backend`` ("cpu" or "cuda")."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"moekernels::{op}", backend.upper()))
    except Exception:  # schema not registered (extension built before this op existed)
        return False


def resolve(spec: OpSpec, backend: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """The backend that will run: ``backend`` itself if it can, else an error; ``auto`` picks the first that can."""
    if backend == "auto":
        device = next(iter(tensors.values())).device.type
        order = (*spec.cuda_order, "eager") if device == "cuda" else ("cpu", "eager")
        for candidate in order:
            if not not_supported_reasons(spec, candidate, tensors):
                return candidate
        return "eager"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
    reasons = not_supported_reasons(spec, backend, tensors)
    if reasons:
        lines = "\n".join(f"  - {r}" for r in reasons)
        raise BackendUnavailableError(f"{spec.name}: backend {backend!r} cannot run these inputs:\n{lines}")
    return backend


def available_backends(spec: OpSpec | None = None) -> dict[str, list[str]]:
    """backend -> environment reasons (empty: usable here). For ``moekernels.info``."""
    return {b: environment_reasons(b) for b in (spec.backends if spec else BACKENDS)}
