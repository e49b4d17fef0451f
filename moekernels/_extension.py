"""Loads the compiled extension ``moekernels._C``. A missing or broken build is never an import error:
``C`` is None and ``load_error`` says why (shown by ``python -m moekernels.info`` and in backend reasons)."""
from __future__ import annotations

C = None
load_error: str | None = None
try:
    from moekernels import _C as C  # noqa: N812  (registers torch.ops.moekernels.*)
except Exception as e:  # ImportError, OSError (undefined symbol, wrong torch ABI), ...
    load_error = f"{type(e).__name__}: {e}".strip()
    if isinstance(e, ModuleNotFoundError):
        load_error += " (not built: `pip install --no-build-isolation .` from a source checkout)"


def available() -> bool:
    return C is not None


def has_cuda_kernels() -> bool:
    return C is not None and bool(C.has_cuda())
