"""Helpers shared by the Triton kernel modules: interpreter detection, block-size helpers, dtype maps, and the
ahead-of-time (AOT) compile registry convention used by ``tools/triton_aot_check.py``.

AOT convention: every kernel module in ``moekernels/ops/triton/`` defines

    AOT_SPECS = [(kernel, signature, constexprs[, options]), ...]

one entry per (dtype, block config) the launcher can pick on a GPU, where ``signature`` maps every non-constexpr
argument name to a Triton type string ("*fp32", "i32", "fp32", ...), ``constexprs`` maps every constexpr argument
name to its value, and ``options`` (optional) holds compile options such as ``num_warps`` / ``num_stages``.
``aot_signature`` builds the signature from argument names and a pointer dtype.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["is_interpreted", "next_pow2", "num_sms", "TRITON_TYPE", "ACC_DTYPE", "acc_torch_dtype", "aot_signature"]

# torch dtype -> Triton type name (as used in AOT signatures: "*" + name for a pointer)
TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
               torch.int32: "i32", torch.int64: "i64"}

# torch input dtype -> Triton accumulator dtype (float32, float64 for float64 inputs)
ACC_DTYPE = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32, torch.float64: tl.float64}


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was defined under TRITON_INTERPRET=1 (the env var is read when @triton.jit runs, so the
    kernel object, not the current environment, says how it will run)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def aot_signature(kernel, ptr_types: dict, scalar_types: dict, constexprs: dict) -> dict:
    """Signature for ``triton.compiler.ASTSource``: each non-constexpr argument of ``kernel`` gets
    ``ptr_types[name]`` (e.g. "*fp32") or ``scalar_types[name]`` (e.g. "i32"); constexpr arguments get "constexpr".
    Raises if an argument is left without a type, so a kernel edit that adds an argument fails the AOT check loudly."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        elif name in scalar_types:
            sig[name] = scalar_types[name]
        else:
            raise KeyError(f"{kernel.__name__}: no AOT type for argument {name!r}")
    return sig
