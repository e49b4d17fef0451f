"""Build csrc/cuda/mog_posterior_cuda.cu for the CPU emulator (emu.h) as a ctypes library, and call it.

The kernel source is used as is, except that every `kernel<<<grid, block, smem, stream>>>(args);` launch is
rewritten into `emu::launch("kernel", grid, block, smem, stream, [&] { kernel(args); });`.
Needs g++ and the CUDA headers (cuda_fp16.h, cuda_runtime_api.h); no GPU, no CUDA runtime library.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\((.*?)\);", re.S)
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def cuda_include_dir() -> str | None:
    """The CUDA toolkit's include dir as nvcc sees it (nvcc may be a wrapper script), or None."""
    cands = [os.environ.get("CUDA_HOME", "") + "/include", "/usr/local/cuda/include"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                                 capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("#$ TOP="):
                    top = line.split("=", 1)[1].strip()
                    cands = [top + "/include", top + "/targets/x86_64-linux/include"] + cands
        except (OSError, subprocess.SubprocessError):
            pass
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "cuda_runtime_api.h")) and os.path.isfile(os.path.join(c, "cuda_fp16.h")):
            return os.path.realpath(c)
    return None


def rewrite_launches(src: str) -> str:
    def sub(m):
        name, cfg, args = m.group(1), m.group(2), m.group(3)
        return f'emu::launch("{name.split("<")[0]}", {cfg}, [&] {{ {name}({args}); }});'

    out, n = _LAUNCH.subn(sub, src)
    if n == 0 or "<<<" in out:
        raise RuntimeError("could not rewrite every kernel launch for the emulator")
    return out


def build(out_dir: Path, source: Path = ROOT / "csrc/cuda/mog_posterior_cuda.cu") -> Path:
    inc = cuda_include_dir()
    if inc is None:
        raise RuntimeError("CUDA headers (cuda_runtime_api.h, cuda_fp16.h) not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    emu_src = out_dir / (source.stem + "_emu.inc")
    emu_src.write_text(rewrite_launches(source.read_text()))
    lib = out_dir / "libmog_emu.so"
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-shared", "-fPIC", "-w",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           f"-I{HERE}", f"-I{ROOT / 'csrc/include'}", f"-I{source.parent}", f"-I{ROOT / 'csrc/cuda'}", f"-I{inc}",
           f'-DEMU_KERNEL_SOURCE="{emu_src}"', str(HERE / "harness.cpp"), "-o", str(lib)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return lib


class Emu:
    """ctypes front end: forward/backward on CPU tensors with the kernel contract's signatures."""

    def __init__(self, lib_path: Path):
        self.lib = ctypes.CDLL(str(lib_path))
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        self.lib.emu_fwd.argtypes = [ctypes.c_int] + [vp] * 7 + [i64] * 3
        self.lib.emu_bwd.argtypes = [ctypes.c_int] + [vp] * 10 + [i64] * 3
        self.lib.emu_bwd_splits.argtypes = [ctypes.c_int, i64, i64, i64]
        self.lib.emu_set_sms.argtypes = [ctypes.c_int]

    def set_sms(self, n: int):
        self.lib.emu_set_sms(n)

    def splits(self, dtype, B, D, K) -> int:
        return self.lib.emu_bwd_splits(DTYPES[dtype], B, D, K)

    def forward(self, x, means, log_var, logpi):
        B, D = x.shape
        K = means.shape[0]
        ins = [t.contiguous() for t in (x, means, log_var, logpi)]
        lr = torch.empty(B, K, dtype=x.dtype)
        lse = torch.empty(B, dtype=x.dtype)
        assign = torch.empty(B, dtype=torch.int64)
        rc = self.lib.emu_fwd(DTYPES[x.dtype], *(t.data_ptr() for t in ins), lr.data_ptr(), lse.data_ptr(),
                              assign.data_ptr(), B, D, K)
        if rc:
            raise RuntimeError(f"emu forward failed: rc={rc} (1: launcher error, 2: out-of-bounds write)")
        return lr, lse, assign

    def backward(self, g_lr, g_lse, x, means, log_var, log_resp):
        B, D = x.shape
        K = means.shape[0]
        ins = [t.contiguous() for t in (g_lr, g_lse, x, means, log_var, log_resp)]
        outs = [torch.empty(B, D, dtype=x.dtype), torch.empty(K, D, dtype=x.dtype),
                torch.empty(K, D, dtype=x.dtype), torch.empty(K, dtype=x.dtype)]
        rc = self.lib.emu_bwd(DTYPES[x.dtype], *(t.data_ptr() for t in ins), *(t.data_ptr() for t in outs), B, D, K)
        if rc:
            raise RuntimeError(f"emu backward failed: rc={rc} (1: launcher error, 2: out-of-bounds write)")
        return tuple(outs)
