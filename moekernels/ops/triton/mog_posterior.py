"""Triton kernels for mog_posterior (DESIGN.md 3.2): kernel -> launcher (``forward`` / ``backward``, the kernel
contract of ``moekernels.ops.mog_posterior._impl``).

    l_k = logpi_k - 1/2 sum_j [log(2 pi v_kj) + ((x_j - c_kj) s_kj)^2],  s_kj = exp(-log_var_kj / 2)

The quadratic form is the direct scaled difference ((x - c) s)^2 on a (BLOCK_B, BLOCK_K, BLOCK_D) tile, summed
over D chunks: no ||x||^2 - 2 x.c + ||c||^2 expansion (cancellation far from the origin) and no tl.dot (a GPU runs
fp32 tl.dot in TF32). Accumulation is float32 (float64 for float64 inputs); inputs fp16 / bf16 / fp32 / fp64.

Forward: one program per block of BLOCK_B rows; loop over K in blocks of BLOCK_K with an online max-shifted
logsumexp and a running argmax (first maximum, as torch). When K fits one block the logits stay in registers;
otherwise the raw logits go to a float32 (float64) buffer and a second pass subtracts lse.

Backward: g_k = dL/dl_k = glr_k + r_k (g_lse - sum_k' glr_k') from the saved log_resp (nothing heavy recomputed);
dx per row block; dmeans / dlog_var / dlogpi as per-program partial sums written to a (P, K, D) buffer (no atomics)
and summed in torch: the backward is deterministic (same inputs -> bitwise the same gradients).

Under TRITON_INTERPRET=1 (CPU) the launchers use big blocks and few programs; on a GPU they autotune over a few
block configs (keyed on K, D and the dtypes) with power-of-two block dims; MOEKERNELS_TRITON_AUTOTUNE=0 skips the
tuning (one heuristic config).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from moekernels.ops.triton._common import (ACC_DTYPE, TRITON_TYPE, acc_torch_dtype, aot_signature, is_interpreted,
                                            next_pow2, num_sms)

__all__ = ["forward", "backward", "AOT_SPECS"]

_LOG_2PI = tl.constexpr(math.log(2.0 * math.pi))


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _mog_logits_block(X, M, LV, LOGPI, rows64, row_ok, ks, k_ok, D,
                      ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Logits l (BLOCK_B, BLOCK_K) of rows x components ks; -inf where ks >= K."""
    offs_d = tl.arange(0, BLOCK_D)
    quad = tl.zeros((BLOCK_B, BLOCK_K), ACC)
    half = tl.zeros((BLOCK_K,), ACC)  # sum_j (log 2 pi + log_var_kj)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + offs_d
        d_ok = ds < D
        x = tl.load(X + rows64[:, None] * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        kd = ks[:, None] * D + ds[None, :]
        kd_ok = k_ok[:, None] & d_ok[None, :]
        c = tl.load(M + kd, mask=kd_ok, other=0.0).to(ACC)
        lv = tl.load(LV + kd, mask=kd_ok, other=0.0).to(ACC)
        s = tl.exp(-0.5 * lv)
        half += tl.sum(tl.where(kd_ok, lv + _LOG_2PI, 0.0), axis=1)
        t = (x[:, None, :] - c[None, :, :]) * s[None, :, :]  # (BLOCK_B, BLOCK_K, BLOCK_D): no cancellation
        quad += tl.sum(t * t, axis=2)
    logpi = tl.load(LOGPI + ks, mask=k_ok, other=0.0).to(ACC)
    l = (logpi - 0.5 * half)[None, :] - 0.5 * quad
    return tl.where(k_ok[None, :], l, float("-inf"))


@triton.jit
def _mog_posterior_fwd_kernel(
    X, M, LV, LOGPI,  # inputs: (B, D), (K, D), (K, D), (K,)
    LOGRESP, LSE, ASSIGN,  # outputs: (B, K), (B,), (B,) int64
    LBUF,  # (B, K) accumulator-dtype buffer for the raw logits when K spans several blocks (else unused)
    B, K, D,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_K_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    if ONE_K_BLOCK:  # all K logits in registers
        k_ok = offs_k < K
        l = _mog_logits_block(X, M, LV, LOGPI, rows64, row_ok, offs_k, k_ok, D, ACC, BLOCK_B, BLOCK_K, BLOCK_D)
        m, a = tl.max(l, axis=1, return_indices=True, return_indices_tie_break_left=True)
        lse = m + tl.log(tl.sum(tl.exp(l - m[:, None]), axis=1))
        tl.store(LOGRESP + rows64[:, None] * K + offs_k[None, :], (l - lse[:, None]).to(LOGRESP.dtype.element_ty),
                 mask=row_ok[:, None] & k_ok[None, :])
    else:  # online logsumexp over K blocks, raw logits to LBUF, second pass subtracts lse
        m = tl.full((BLOCK_B,), float("-inf"), ACC)
        ssum = tl.zeros((BLOCK_B,), ACC)
        a = tl.zeros((BLOCK_B,), tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < K
            l = _mog_logits_block(X, M, LV, LOGPI, rows64, row_ok, ks, k_ok, D, ACC, BLOCK_B, BLOCK_K, BLOCK_D)
            b_max, b_arg = tl.max(l, axis=1, return_indices=True, return_indices_tie_break_left=True)
            m_new = tl.maximum(m, b_max)
            ssum = ssum * tl.exp(m - m_new) + tl.sum(tl.exp(l - m_new[:, None]), axis=1)
            a = tl.where(b_max > m, k0 + b_arg, a)  # strict: the first maximum wins across blocks, as torch
            m = m_new
            tl.store(LBUF + rows64[:, None] * K + ks[None, :], l, mask=row_ok[:, None] & k_ok[None, :])
        lse = m + tl.log(ssum)
        tl.debug_barrier()  # the raw logits stored above by other threads of this program are visible now
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            msk = row_ok[:, None] & (ks < K)[None, :]
            bk = rows64[:, None] * K + ks[None, :]
            l = tl.load(LBUF + bk, mask=msk, other=0.0)
            tl.store(LOGRESP + bk, (l - lse[:, None]).to(LOGRESP.dtype.element_ty), mask=msk)
    tl.store(LSE + rows, lse.to(LSE.dtype.element_ty), mask=row_ok)
    tl.store(ASSIGN + rows, a.to(tl.int64), mask=row_ok)


@triton.jit
def _mog_posterior_bwd_kernel(
    GLR, GLSE, COEF,  # upstream grads (B, K), (B,); COEF (B,) = g_lse - sum_k glr_k, used when K spans several blocks
    X, M, LV, LR,  # saved: (B, D), (K, D), (K, D), log_resp (B, K)
    DX,  # (B, D) output
    PM, PV, PPI,  # per-program partials (P, K, D): sum_i g t, sum_i g t (x - c); (P, K): sum_i g
    B, K, D,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_K_BLOCK: tl.constexpr,
):
    # t_ikj = (x_ij - c_kj) / v_kj ;  dx_ij = -sum_k g_ik t_ikj ;  dmeans_kj = sum_i g_ik t_ikj
    # dlog_var_kj = 1/2 sum_i g_ik t_ikj (x_ij - c_kj) - 1/2 sum_i g_ik ;  dlogpi_k = sum_i g_ik
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_row_blocks = tl.cdiv(B, BLOCK_B)
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    pbase = pid.to(tl.int64) * K
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        if not ONE_K_BLOCK:
            tl.debug_barrier()  # dx written for the previous K block by other threads of this program is visible
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + offs_d
            d_ok = ds < D
            kd = ks[:, None] * D + ds[None, :]
            kd_ok = k_ok[:, None] & d_ok[None, :]
            c = tl.load(M + kd, mask=kd_ok, other=0.0).to(ACC)
            iv = tl.exp(-tl.load(LV + kd, mask=kd_ok, other=0.0).to(ACC))
            acc_m = tl.zeros((BLOCK_K, BLOCK_D), ACC)
            acc_v = tl.zeros((BLOCK_K, BLOCK_D), ACC)
            acc_pi = tl.zeros((BLOCK_K,), ACC)
            for rb in range(pid, n_row_blocks, nprog):
                rows = rb * BLOCK_B + offs_b
                row_ok = rows < B
                rows64 = rows.to(tl.int64)
                bk = rows64[:, None] * K + ks[None, :]
                bk_ok = row_ok[:, None] & k_ok[None, :]
                glr = tl.load(GLR + bk, mask=bk_ok, other=0.0).to(ACC)
                r = tl.exp(tl.load(LR + bk, mask=bk_ok, other=float("-inf")).to(ACC))
                if ONE_K_BLOCK:
                    coef = tl.load(GLSE + rows, mask=row_ok, other=0.0).to(ACC) - tl.sum(glr, axis=1)
                else:
                    coef = tl.load(COEF + rows, mask=row_ok, other=0.0).to(ACC)
                g = glr + r * coef[:, None]  # (BLOCK_B, BLOCK_K); zero outside the valid rows / components
                bd = rows64[:, None] * D + ds[None, :]
                bd_ok = row_ok[:, None] & d_ok[None, :]
                x = tl.load(X + bd, mask=bd_ok, other=0.0).to(ACC)
                diff = x[:, None, :] - c[None, :, :]  # (BLOCK_B, BLOCK_K, BLOCK_D)
                gt = g[:, :, None] * (diff * iv[None, :, :])
                dx = -tl.sum(gt, axis=1)
                if not ONE_K_BLOCK:  # accumulate over K blocks (this program's own rows: deterministic)
                    dx += tl.load(DX + bd, mask=bd_ok & (k0 > 0), other=0.0).to(ACC)
                tl.store(DX + bd, dx.to(DX.dtype.element_ty), mask=bd_ok)
                acc_m += tl.sum(gt, axis=0)
                acc_v += tl.sum(gt * diff, axis=0)
                acc_pi += tl.sum(g, axis=0)
            tl.store(PM + (pbase + ks[:, None]) * D + ds[None, :], acc_m, mask=kd_ok)
            tl.store(PV + (pbase + ks[:, None]) * D + ds[None, :], acc_v, mask=kd_ok)
            tl.store(PPI + pbase + ks, acc_pi, mask=k_ok & (d0 == 0))


# ----------------------------------------------------------------------------------------------- block configs
# Interpreter: one numpy op per tl op, ~8 ms per program instance -> few programs with big tiles.
_INTERP_TILE = 1 << 16  # elements of the (BLOCK_B, BLOCK_K, BLOCK_D) tile
_INTERP_MAX_PROGRAMS_BWD = 4
_INTERP_MAX_BLOCK_K = 64  # K above this takes the several-K-blocks path (tests lower it to reach that path)

# GPU: BLOCK_K fixed by K (launcher), (BLOCK_B, BLOCK_D, num_warps) autotuned among these.
_GPU_MAX_BLOCK_K = 32
# register budget, values per thread: BLOCK_B * BLOCK_K * (BLOCK_D + 2) / (32 * num_warps). The backward keeps
# about twice as many tile-sized values live (diff, g t, g t diff); ptxas spills above ~32 there (AOT check).
_GPU_TILE_PER_THREAD = {"fwd": 64, "bwd": 32}
_GPU_CONFIGS = [(bb, bd, w) for bb in (16, 32, 64, 128, 256) for bd in (2, 4, 8, 16, 32) for w in (4, 8)]


def _gpu_block_k(K: int) -> int:
    return min(max(next_pow2(K), 2), _GPU_MAX_BLOCK_K)


def _gpu_candidates(which: str, block_k: int, D: int):
    """(BLOCK_B, BLOCK_D, num_warps) configs for kernel ``which`` ("fwd" / "bwd") with between 1/4 of and the full
    register budget of live values per thread, BLOCK_D <= D (padded to a power of 2) and BLOCK_D >= 8
    when D >= 8; the smallest tile first."""
    d_cap = max(next_pow2(D), 2)
    d_floor = min(8, d_cap)
    budget = _GPU_TILE_PER_THREAD[which]
    # live values per thread: the 3-D tile plus ~2 (BLOCK_B, BLOCK_K) arrays (quad / l, g / r), which dominate
    # when BLOCK_D is small
    fits = {(bb, bd, w): bb * block_k * (bd + 2) / (32 * w) for bb, bd, w in _GPU_CONFIGS if d_floor <= bd <= d_cap}
    fits = {c: e for c, e in fits.items() if e <= budget}
    if not fits:
        return [(16, 2, 4)]
    floor = min(budget / 4, max(fits.values()) / 4)  # tiny K and D: the biggest tiles available
    return sorted((c for c, e in fits.items() if e >= floor), key=lambda c: (c[0] * c[1], c[2]))


def _pruner(which):
    def prune(configs, named_args, **kwargs):
        cands = _gpu_candidates(which, kwargs["BLOCK_K"], named_args["D"])
        if os.environ.get("MOEKERNELS_TRITON_AUTOTUNE", "1") == "0":  # no tuning: the middle candidate
            cands = cands[len(cands) // 2:len(cands) // 2 + 1]
        allowed = set(cands)
        kept = [c for c in configs if (c.kwargs["BLOCK_B"], c.kwargs["BLOCK_D"], c.num_warps) in allowed]
        return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_D"], c.num_warps))]

    return prune


_AUTOTUNE_CONFIGS = [triton.Config({"BLOCK_B": bb, "BLOCK_D": bd}, num_warps=w) for bb, bd, w in _GPU_CONFIGS]


def _tuned(kernel, which):
    return triton.autotune(configs=_AUTOTUNE_CONFIGS, key=["K", "D"],
                           prune_configs_by={"early_config_prune": _pruner(which)})(kernel)


_fwd_tuned = None if is_interpreted(_mog_posterior_fwd_kernel) else _tuned(_mog_posterior_fwd_kernel, "fwd")
_bwd_tuned = None if is_interpreted(_mog_posterior_bwd_kernel) else _tuned(_mog_posterior_bwd_kernel, "bwd")


def _interp_blocks(B: int, K: int, D: int):
    block_k = min(next_pow2(K), _INTERP_MAX_BLOCK_K)
    block_d = min(next_pow2(D), 64)
    block_b = max(16, min(next_pow2(B), _INTERP_TILE // (block_k * block_d)))
    return block_b, block_k, block_d


# ----------------------------------------------------------------------------------------------- launchers
def forward(x, means, log_var, logpi):
    """x (B, D), means (K, D), log_var (K, D), logpi (K,) normalised; all contiguous, same dtype and device.
    Returns (log_resp (B, K), lse (B,), assign (B,) int64) in x's dtype (assign int64)."""
    B, D = x.shape
    K = means.shape[0]
    log_resp = torch.empty(B, K, device=x.device, dtype=x.dtype)
    lse = torch.empty(B, device=x.device, dtype=x.dtype)
    assign = torch.empty(B, device=x.device, dtype=torch.int64)
    if B == 0:
        return log_resp, lse, assign
    acc_t = acc_torch_dtype(x.dtype)
    if is_interpreted(_mog_posterior_fwd_kernel):
        block_b, block_k, block_d = _interp_blocks(B, K, D)
    else:
        block_k = _gpu_block_k(K)
    one = block_k >= K
    lbuf = log_resp if (one or x.dtype == acc_t) else torch.empty(B, K, device=x.device, dtype=acc_t)
    args = (x, means, log_var, logpi, log_resp, lse, assign, lbuf, B, K, D)
    if _fwd_tuned is None:
        _mog_posterior_fwd_kernel[(triton.cdiv(B, block_b),)](
            *args, ACC=ACC_DTYPE[x.dtype], BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d, ONE_K_BLOCK=one)
    else:
        with torch.cuda.device(x.device):
            _fwd_tuned[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)](
                *args, ACC=ACC_DTYPE[x.dtype], BLOCK_K=block_k, ONE_K_BLOCK=one)
    return log_resp, lse, assign


def backward(g_log_resp, g_lse, x, means, log_var, log_resp):
    """Gradients of (log_resp, lse) -> (dx (B, D), dmeans (K, D), dlog_var (K, D), dlogpi (K,)) in x's dtype.
    Deterministic: per-program partial sums (no atomics), reduced in a fixed order by torch."""
    B, D = x.shape
    K = means.shape[0]
    acc_t = acc_torch_dtype(x.dtype)
    dx = torch.empty_like(x)
    if B == 0:
        z = torch.zeros_like(means)
        return dx, z, z.clone(), means.new_zeros(K)
    if is_interpreted(_mog_posterior_bwd_kernel):
        block_b, block_k, block_d = _interp_blocks(B, K, D)
        nprog = min(triton.cdiv(B, block_b), _INTERP_MAX_PROGRAMS_BWD)
    else:
        block_k = _gpu_block_k(K)
        # enough programs to fill the GPU (2 per SM), but few enough that the partials stay small; programs without
        # rows (when the tuned BLOCK_B is large) write zero partials
        nprog = min(triton.cdiv(B, 16), 2 * num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device()))
    one = block_k >= K
    coef = g_lse if one else (g_lse.to(acc_t) - g_log_resp.sum(1, dtype=acc_t))
    pm = torch.empty(nprog, K, D, device=x.device, dtype=acc_t)
    pv = torch.empty(nprog, K, D, device=x.device, dtype=acc_t)
    ppi = torch.empty(nprog, K, device=x.device, dtype=acc_t)
    args = (g_log_resp, g_lse, coef, x, means, log_var, log_resp, dx, pm, pv, ppi, B, K, D)
    if _bwd_tuned is None:
        _mog_posterior_bwd_kernel[(nprog,)](
            *args, ACC=ACC_DTYPE[x.dtype], BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d, ONE_K_BLOCK=one)
    else:
        with torch.cuda.device(x.device):
            _bwd_tuned[(nprog,)](*args, ACC=ACC_DTYPE[x.dtype], BLOCK_K=block_k, ONE_K_BLOCK=one)
    dmeans = pm.sum(0)
    dlogpi = ppi.sum(0)
    dlog_var = 0.5 * pv.sum(0) - 0.5 * dlogpi[:, None]
    return dx, dmeans.to(x.dtype), dlog_var.to(x.dtype), dlogpi.to(x.dtype)


# ----------------------------------------------------------------------------------------------- AOT specs
def _aot_specs():
    """What the GPU launchers can pick: every dtype x {K in one block, K in several blocks} at the smallest config;
    all autotune candidates for a typical K=8, D=16 (fp32); the smallest and largest candidates for the other
    BLOCK_K values (D=64 and D=2). tools/triton_aot_check.py compiles them (sm_90; --arch 90,80 adds sm_80)."""
    specs = []
    scalars = {"B": "i32", "K": "i32", "D": "i32"}

    def add(which, dtype, block_k, one, cfg):
        block_b, block_d, warps = cfg
        p, a = "*" + TRITON_TYPE[dtype], "*" + ("fp64" if dtype == torch.float64 else "fp32")
        cexp = {"ACC": ACC_DTYPE[dtype], "BLOCK_B": block_b, "BLOCK_K": block_k, "BLOCK_D": block_d,
                "ONE_K_BLOCK": one}
        if which == "fwd":
            kernel = _mog_posterior_fwd_kernel
            ptrs = {"X": p, "M": p, "LV": p, "LOGPI": p, "LOGRESP": p, "LSE": p, "ASSIGN": "*i64", "LBUF": a}
        else:
            kernel = _mog_posterior_bwd_kernel
            ptrs = {"GLR": p, "GLSE": p, "COEF": p if one else a, "X": p, "M": p, "LV": p, "LR": p, "DX": p,
                    "PM": a, "PV": a, "PPI": a}
        specs.append((kernel, aot_signature(kernel, ptrs, scalars, cexp), cexp, {"num_warps": warps}))

    for which in ("fwd", "bwd"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for one in (True, False):
                add(which, dtype, 8, one, _gpu_candidates(which, 8, 16)[0])
        for cfg in _gpu_candidates(which, 8, 16)[1:]:
            add(which, torch.float32, 8, True, cfg)
        for block_k in (2, 4, 16, 32):
            cands = _gpu_candidates(which, block_k, 64) + _gpu_candidates(which, block_k, 2)
            for cfg in dict.fromkeys([cands[0], cands[-1]]):
                add(which, torch.float32, block_k, block_k < _GPU_MAX_BLOCK_K, cfg)
    return specs


AOT_SPECS = _aot_specs()
