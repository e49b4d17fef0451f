"""``python -m moekernels.info``: versions, the compiled extension, and which backends can run here (and why not)."""
from __future__ import annotations

import os
import platform
import sys


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_lines() -> list[str]:
    try:
        import pynvml
    except ImportError:
        return ["GPU (nvidia-ml-py): not installed (`pip install nvidia-ml-py`)"]
    try:
        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        out = [f"GPU driver: {pynvml.nvmlSystemGetDriverVersion()}"]
        for i in range(n):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append(f"GPU {i}: {name.decode() if isinstance(name, bytes) else name}")
        return out or ["GPU: none"]
    except Exception as e:  # no driver
        return [f"GPU (nvidia-ml-py): none ({type(e).__name__}: {e})"]


def report() -> str:
    import torch

    import moekernels
    from moekernels import _extension
    from moekernels.ops import dispatch

    lines = [
        f"moekernels {moekernels.__version__}",
        f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"cuda available: {torch.cuda.is_available()}",
        f"CPU: {_cpu_model()}, {torch.get_num_threads()} torch threads",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__} (TRITON_INTERPRET={'1' if dispatch.triton_interpret() else '0'})")
    except Exception as e:
        lines.append(f"triton: not available ({type(e).__name__}: {e})")
    if _extension.available():
        C = _extension.C
        archs = C.cuda_archs() or "-"
        lines.append(f"compiled extension: {C.__file__}")
        simd = C.cpu_capability()
        if os.environ.get("MOEKERNELS_CPU_GENERIC", "0") == "1":
            simd = f"generic (MOEKERNELS_CPU_GENERIC=1; the machine has {simd})"
        lines.append(f"  CPU SIMD path: {simd}; CUDA kernels: {C.has_cuda()} (archs: {archs})")
    else:
        lines.append(f"compiled extension: unavailable ({_extension.load_error})")
    lines.extend(_gpu_lines())
    lines.append("backends:")
    for name, reasons in dispatch.available_backends().items():
        lines.append(f"  {name:7s} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
