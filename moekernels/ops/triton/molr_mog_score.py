"""Triton kernels for ``molr_mog_score`` (DESIGN.md section 3.1): kernel -> launcher.

Kernel contract (shared with the cpu and cuda backends; ``moekernels/ops/molr_mog_score.py`` validates, broadcasts
s/gamma to (B,), normalises logpi and makes everything contiguous before calling):

    forward(x (B,D), s (B,), gamma (B,), A (K,D,d) or None, mu (K,L,d), log_var (K,L,d), logpi (K,L), return_weights)
        -> (score (B,D), lse (B,), w (B,K,L) or an empty tensor)
    backward(G, g_lse, g_w or None, x, s, gamma, A or None, mu, log_var, logpi, lse)
        -> (dx (B,D), dA (K,D,d) or None, dmu (K,L,d), dlog_var (K,L,d), dlogpi (K,L))

Layout inside a program (flash-attention style, one program per block of BLOCK_B rows):
  * The K experts' latent coordinates live in one register tile Z (BLOCK_B, K_P*DP): column k*DP + i holds z_k,i
    (K_P = next_pow2(K), DP = next_pow2(d), padded columns masked to 0), so Z = X A_cat is one tl.dot per D chunk
    and a reshape gives the (BLOCK_B, K_P, DP) view used for the per-component math.
  * Forward: pass 1 (D chunks) Z = X A_cat and ||x||^2; then an online (running-max) softmax over the L components
    of every expert accumulates c_k = sum_l w_kl (z_k/gamma^2 - e_kl/m_kl) in registers; pass 2 (D chunks)
    score = -x/gamma^2 + C A_cat^T.  Nothing of size B x K x L x d is stored.
  * Backward: one D sweep recomputes Z and dC = G A_cat (two tl.dot per chunk, shared A chunk); a first sweep over L
    recomputes the softmax normaliser (running max/sum) with sum_kl w dw and sum_kl w g_w; a second forms dl, de,
    dm, accumulates dZ (and C) in registers and writes per-program partial sums of dmu, dlog_var and dlogpi; a last
    D sweep writes dx = -G/gamma^2 + dZ A_cat^T - (sum_kl dl_kl) x/gamma^2.
    Reductions over rows are deterministic (no atomics): dmu / dlog_var / dlogpi are per-program partials
    (n_programs, K, L, d) summed by torch; dA = G^T C + X^T dZ is two torch GEMMs on the per-row C and dZ (B, K*d)
    that the kernel writes.  Five GEMM-shaped products backward, as in DESIGN.md.

Numerics (float32 with small gamma is where the formula is ill-conditioned; these choices keep the fused result at or
below the error of the float32 reference, measured against float64):
  * (||z_k||^2 - ||x||^2) is formed before the 1/(2 gamma^2) scaling, so the softmax runs on moderate logits
    l_kl + D/2 log 2 pi; w = exp(l - max) / sum, never exp(l - (max + log sum)), whose rounding is |l| * eps.
  * The backward recomputes the normaliser from Z instead of reading the saved lse (free: Z is recomputed anyway,
    and w then does not depend on the rounding of lse); ``lse`` is accepted for the contract but not read.
  * dl_kl = w_kl ((dw_kl - sum w dw) + (g_lse + g_w_kl - sum w g_w)): the large dw (~ |dc| |z| / gamma^2) cancel
    among themselves before the upstream terms are added.  dx uses the computed sum_kl dl_kl (= g_lse analytically)
    so that its rounding cancels against the sum_l dl_kl z_k / gamma^2 inside dZ.
  * A = None (identity, D = d): no projection, and the terms that cancel exactly because sum_kl w_kl = 1 are
    dropped: score = -sum_kl w_kl e_kl/m_kl and dx = sum_kl de_kl (no -x/gamma^2 + x/gamma^2 cancellation).

Precision: float32 inputs accumulate in float32 and every tl.dot uses input_precision="ieee" (no TF32); float64
inputs accumulate in float64 (not offered by the dispatcher for triton, used by gradcheck); float16/bfloat16 inputs
feed X A_cat and G A_cat to tensor cores with float32 accumulation, and the float32-operand products C A_cat^T and
dZ A_cat^T use TF32 (HALF_FP32_DOT_PRECISION).

Block sizes: under TRITON_INTERPRET=1 (CPU) big row blocks and one D chunk (the interpreter costs ~8 ms per program
instance).  On a GPU, the (BLOCK_B, K_P*DP) tile is ~1024 elements (fp32: FMA dots), ~2048 (fp16/bf16: MMA) or
~512 (fp64), from the sm_90 ptxas reports of tools/triton_aot_check.py (no spills at K_P*DP = 32 and 128; K_P*DP
= 512 spills: correct but slow).  All tl.dot dimensions are powers of two >= 16 (K_P*DP padded up to 16).
No autotuning.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from moekernels.ops.triton._common import (ACC_DTYPE, TRITON_TYPE, acc_torch_dtype, aot_signature, is_interpreted,
                                           next_pow2)

__all__ = ["forward", "backward", "AOT_SPECS", "_molr_mog_score_fwd_kernel", "_molr_mog_score_bwd_kernel"]

FP32_DOT_PRECISION = "ieee"
HALF_FP32_DOT_PRECISION = "tf32"
_HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))


# ----------------------------------------------------------------------------------------------- shared helpers
@triton.jit
def _load_rows(s_ptr, gamma_ptr, pid, B, BLOCK_B: tl.constexpr, ACC: tl.constexpr):
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    s = tl.load(s_ptr + rows, mask=rmask, other=0.0).to(ACC)
    gam = tl.load(gamma_ptr + rows, mask=rmask, other=1.0).to(ACC)
    inv_g2 = 1.0 / (gam * gam)
    return rows, rmask, s, gam * gam, inv_g2


@triton.jit
def _component(z3, rterm, s, g2, inv_g2, mu_ptr, lv_ptr, logpi_ptr, l, K, L, d,
               HAS_A: tl.constexpr, K_P: tl.constexpr, DP: tl.constexpr, ACC: tl.constexpr):
    """Component l of every expert for a block of rows: returns (logit (BLOCK_B, K_P) = l_kl + D/2 log(2 pi), -inf
    on padded experts; e, 1/m, a = [z/gamma^2] - e/m (BLOCK_B, K_P, DP, zero on padded columns); the parameter
    offsets, their mask and the variances v (1, K_P, DP)).  rterm (BLOCK_B, K_P) holds the per-expert terms
    (||z_k||^2 - ||x||^2)/(2 gamma^2) - (D-d)/2 log gamma^2 (HAS_A only)."""
    kk = tl.arange(0, K_P)
    ii = tl.arange(0, DP)
    kmask = kk < K
    pmask = kmask[None, :, None] & (ii < d)[None, None, :]  # (1, K_P, DP)
    poff = kk[None, :, None] * (L * d) + l * d + ii[None, None, :]
    mu = tl.load(mu_ptr + poff, mask=pmask, other=0.0).to(ACC)
    v = tl.exp(tl.load(lv_ptr + poff, mask=pmask, other=0.0).to(ACC))
    lp = tl.load(logpi_ptr + kk * L + l, mask=kmask, other=0.0).to(ACC)
    s3 = s[:, None, None]
    e = z3 - s3 * mu
    m = s3 * s3 * v + g2[:, None, None]
    inv_m = 1.0 / m
    q = tl.where(pmask, tl.log(m) + e * e * inv_m, 0.0)
    logit = lp[None, :] - 0.5 * tl.sum(q, 2)
    if HAS_A:
        logit += rterm
        a = z3 * inv_g2[:, None, None] - e * inv_m
    else:
        a = -e * inv_m
    a = tl.where(pmask, a, 0.0)
    logit = tl.where(kmask[None, :], logit, float("-inf"))
    return logit, e, inv_m, a, poff, pmask, v


# ----------------------------------------------------------------------------------------------- forward kernel
@triton.jit
def _molr_mog_score_fwd_kernel(
    x_ptr, s_ptr, gamma_ptr, a_ptr, mu_ptr, lv_ptr, logpi_ptr,  # inputs
    score_ptr, lse_ptr, w_ptr,  # outputs
    B, D, K, L, d,
    HAS_A: tl.constexpr, RETURN_W: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, K_P: tl.constexpr, DP: tl.constexpr,
    ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT2_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, rmask, s, g2, inv_g2 = _load_rows(s_ptr, gamma_ptr, pid, B, BLOCK_B, ACC)
    rows64 = rows.to(tl.int64)
    KDP: tl.constexpr = K_P * DP
    cols = tl.arange(0, KDP)
    ck = cols // DP
    ci = cols % DP
    cmask = (ck < K) & (ci < d)
    xsq = tl.zeros((BLOCK_B,), dtype=ACC)

    # ---- pass 1: Z = X A_cat (D chunks), ||x||^2
    if HAS_A:
        z = tl.zeros((BLOCK_B, KDP), dtype=ACC)
        for j0 in range(0, D, BLOCK_D):
            jj = j0 + tl.arange(0, BLOCK_D)
            jmask = jj < D
            xt = tl.load(x_ptr + rows64[:, None] * D + jj[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0)
            at = tl.load(a_ptr + ck[None, :] * (D * d) + jj[:, None] * d + ci[None, :],
                         mask=jmask[:, None] & cmask[None, :], other=0.0)
            z = tl.dot(xt.to(DOT_IN), at.to(DOT_IN), z, input_precision="ieee", out_dtype=ACC)
            xf = xt.to(ACC)
            xsq += tl.sum(xf * xf, 1)
        z3 = tl.reshape(z, (BLOCK_B, K_P, DP))
        # ||z_k||^2 - ||x||^2 (= -||x - A_k z_k||^2) before scaling by 1/gamma^2: the big terms cancel first
        rterm = 0.5 * (tl.sum(z3 * z3, 2) - xsq[:, None]) * inv_g2[:, None] \
            - 0.5 * tl.cast(D - d, ACC) * tl.log(g2)[:, None]
    else:
        ii = tl.arange(0, DP)
        xt = tl.load(x_ptr + rows64[:, None] * D + ii[None, :], mask=rmask[:, None] & (ii < D)[None, :],
                     other=0.0).to(ACC)
        z3 = tl.broadcast_to(xt[:, None, :], (BLOCK_B, K_P, DP))
        rterm = tl.zeros((BLOCK_B, K_P), dtype=ACC)

    # ---- online softmax over the K*L components, C = sum_l w a accumulated in registers
    m_i = tl.full((BLOCK_B,), float("-inf"), dtype=ACC)
    s_i = tl.zeros((BLOCK_B,), dtype=ACC)
    cacc = tl.zeros((BLOCK_B, K_P, DP), dtype=ACC)
    for l in range(L):
        logit, e, inv_m, a, poff, pmask, v = _component(
            z3, rterm, s, g2, inv_g2, mu_ptr, lv_ptr, logpi_ptr, l, K, L, d, HAS_A, K_P, DP, ACC)
        m_new = tl.maximum(m_i, tl.max(logit, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(logit - m_new[:, None])
        s_i = s_i * alpha + tl.sum(p, 1)
        cacc = cacc * alpha[:, None, None] + p[:, :, None] * a
        m_i = m_new
    inv_s = 1.0 / s_i
    c3 = cacc * inv_s[:, None, None]
    lse = (m_i - tl.cast(D, ACC) * _HALF_LOG_2PI) + tl.log(s_i)
    tl.store(lse_ptr + rows, lse.to(lse_ptr.dtype.element_ty), mask=rmask)

    if RETURN_W:
        kk = tl.arange(0, K_P)
        wmask = rmask[:, None] & (kk < K)[None, :]
        for l in range(L):
            logit, e, inv_m, a, poff, pmask, v = _component(
                z3, rterm, s, g2, inv_g2, mu_ptr, lv_ptr, logpi_ptr, l, K, L, d, HAS_A, K_P, DP, ACC)
            w = tl.exp(logit - m_i[:, None]) * inv_s[:, None]
            tl.store(w_ptr + rows64[:, None] * (K * L) + kk[None, :] * L + l, w.to(w_ptr.dtype.element_ty), mask=wmask)

    # ---- pass 2: score = -x/gamma^2 + C A_cat^T (D chunks)
    if HAS_A:
        c2 = tl.reshape(c3, (BLOCK_B, KDP))
        for j0 in range(0, D, BLOCK_D):
            jj = j0 + tl.arange(0, BLOCK_D)
            jmask = jj < D
            att = tl.load(a_ptr + ck[:, None] * (D * d) + jj[None, :] * d + ci[:, None],
                          mask=cmask[:, None] & jmask[None, :], other=0.0).to(ACC)
            out = tl.dot(c2, att, input_precision=DOT2_PREC, out_dtype=ACC)
            omask = rmask[:, None] & jmask[None, :]
            xt = tl.load(x_ptr + rows64[:, None] * D + jj[None, :], mask=omask, other=0.0).to(ACC)
            out = out - xt * inv_g2[:, None]
            tl.store(score_ptr + rows64[:, None] * D + jj[None, :], out.to(score_ptr.dtype.element_ty), mask=omask)
    else:
        ii = tl.arange(0, DP)
        out = tl.sum(c3, 1)  # -x/gamma^2 + sum_kl w x/gamma^2 = 0 exactly: only -sum_kl w e/m remains
        tl.store(score_ptr + rows64[:, None] * D + ii[None, :], out.to(score_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (ii < D)[None, :])


# ----------------------------------------------------------------------------------------------- backward kernel
@triton.jit
def _molr_mog_score_bwd_kernel(
    g_ptr, glse_ptr, gw_ptr, x_ptr, s_ptr, gamma_ptr, a_ptr, mu_ptr, lv_ptr, logpi_ptr,  # inputs
    dx_ptr, c_ws_ptr, dz_ws_ptr, dmu_part_ptr, dlv_part_ptr, dlp_part_ptr,  # outputs
    B, D, K, L, d,
    HAS_A: tl.constexpr, HAS_GW: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, K_P: tl.constexpr, DP: tl.constexpr,
    ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT2_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, rmask, s, g2, inv_g2 = _load_rows(s_ptr, gamma_ptr, pid, B, BLOCK_B, ACC)
    rows64 = rows.to(tl.int64)
    glse = tl.load(glse_ptr + rows, mask=rmask, other=0.0).to(ACC)
    KDP: tl.constexpr = K_P * DP
    cols = tl.arange(0, KDP)
    ck = cols // DP
    ci = cols % DP
    cmask = (ck < K) & (ci < d)
    kk = tl.arange(0, K_P)
    ii = tl.arange(0, DP)
    kmask = kk < K
    kl_mask = rmask[:, None] & kmask[None, :]

    # ---- recompute Z = X A_cat and dC = G A_cat (one sweep over D, shared A chunk)
    if HAS_A:
        z = tl.zeros((BLOCK_B, KDP), dtype=ACC)
        dc = tl.zeros((BLOCK_B, KDP), dtype=ACC)
        xsq = tl.zeros((BLOCK_B,), dtype=ACC)
        for j0 in range(0, D, BLOCK_D):
            jj = j0 + tl.arange(0, BLOCK_D)
            jmask = jj < D
            omask = rmask[:, None] & jmask[None, :]
            xt = tl.load(x_ptr + rows64[:, None] * D + jj[None, :], mask=omask, other=0.0)
            gt = tl.load(g_ptr + rows64[:, None] * D + jj[None, :], mask=omask, other=0.0)
            at = tl.load(a_ptr + ck[None, :] * (D * d) + jj[:, None] * d + ci[None, :],
                         mask=jmask[:, None] & cmask[None, :], other=0.0)
            at = at.to(DOT_IN)
            z = tl.dot(xt.to(DOT_IN), at, z, input_precision="ieee", out_dtype=ACC)
            dc = tl.dot(gt.to(DOT_IN), at, dc, input_precision="ieee", out_dtype=ACC)
            xf = xt.to(ACC)
            xsq += tl.sum(xf * xf, 1)
        z3 = tl.reshape(z, (BLOCK_B, K_P, DP))
        dc3 = tl.reshape(dc, (BLOCK_B, K_P, DP))
        rterm = 0.5 * (tl.sum(z3 * z3, 2) - xsq[:, None]) * inv_g2[:, None] \
            - 0.5 * tl.cast(D - d, ACC) * tl.log(g2)[:, None]
    else:
        omask = rmask[:, None] & (ii < D)[None, :]
        xt = tl.load(x_ptr + rows64[:, None] * D + ii[None, :], mask=omask, other=0.0).to(ACC)
        gt = tl.load(g_ptr + rows64[:, None] * D + ii[None, :], mask=omask, other=0.0).to(ACC)
        z3 = tl.broadcast_to(xt[:, None, :], (BLOCK_B, K_P, DP))
        dc3 = tl.broadcast_to(gt[:, None, :], (BLOCK_B, K_P, DP))
        rterm = tl.zeros((BLOCK_B, K_P), dtype=ACC)

    # ---- sweep 1 over L: softmax normaliser (running max/sum), sum_kl w dw and sum_kl w g_w
    m_i = tl.full((BLOCK_B,), float("-inf"), dtype=ACC)
    s_i = tl.zeros((BLOCK_B,), dtype=ACC)
    t_i = tl.zeros((BLOCK_B,), dtype=ACC)
    u_i = tl.zeros((BLOCK_B,), dtype=ACC)
    for l in range(L):
        logit, e, inv_m, a, poff, pmask, v = _component(
            z3, rterm, s, g2, inv_g2, mu_ptr, lv_ptr, logpi_ptr, l, K, L, d, HAS_A, K_P, DP, ACC)
        dw = tl.sum(dc3 * a, 2)
        m_new = tl.maximum(m_i, tl.max(logit, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(logit - m_new[:, None])
        s_i = s_i * alpha + tl.sum(p, 1)
        t_i = t_i * alpha + tl.sum(p * dw, 1)
        if HAS_GW:
            gw = tl.load(gw_ptr + rows64[:, None] * (K * L) + kk[None, :] * L + l, mask=kl_mask, other=0.0).to(ACC)
            u_i = u_i * alpha + tl.sum(p * gw, 1)
        m_i = m_new
    inv_s = 1.0 / s_i
    # dl_kl = w_kl * ((dw_kl - sum w dw) + (g_lse [+ g_w_kl - sum w g_w])): the large dw (~ |dc||z|/gamma^2) cancel
    # among themselves first, so the small upstream terms are not rounded at the scale of dw
    swdw = t_i * inv_s
    shift = glse
    if HAS_GW:
        shift -= u_i * inv_s

    # ---- sweep 2 over L: dl, de, dm; dZ (and C for dA) in registers; per-program partials of the parameter grads
    dzacc = tl.zeros((BLOCK_B, K_P, DP), dtype=ACC)
    cacc = tl.zeros((BLOCK_B, K_P, DP), dtype=ACC)
    dlsum = tl.zeros((BLOCK_B,), dtype=ACC)
    rm3 = rmask[:, None, None]
    for l in range(L):
        logit, e, inv_m, a, poff, pmask, v = _component(
            z3, rterm, s, g2, inv_g2, mu_ptr, lv_ptr, logpi_ptr, l, K, L, d, HAS_A, K_P, DP, ACC)
        # w = exp(logit - max) / sum, never exp(logit - (max + log sum)) (that rounds at |max| * eps)
        w = tl.where(kl_mask, tl.exp(logit - m_i[:, None]) * inv_s[:, None], 0.0)
        dw = tl.sum(dc3 * a, 2)
        small = tl.broadcast_to(shift[:, None], (BLOCK_B, K_P))
        if HAS_GW:
            gw = tl.load(gw_ptr + rows64[:, None] * (K * L) + kk[None, :] * L + l, mask=kl_mask, other=0.0).to(ACC)
            small += gw
        dl = w * ((dw - swdw[:, None]) + small)
        w3 = w[:, :, None]
        dl3 = dl[:, :, None]
        wdc = w3 * dc3
        keep = pmask & rm3
        de = tl.where(keep, -(wdc + dl3 * e) * inv_m, 0.0)
        dm = tl.where(keep, (wdc * e * inv_m - 0.5 * dl3 * (1.0 - e * e * inv_m)) * inv_m, 0.0)
        if HAS_A:
            dzacc += (wdc + dl3 * z3) * inv_g2[:, None, None] + de
            cacc += w3 * a
            dlsum += tl.sum(dl, 1)
        else:
            dzacc += de  # dx = -G/gamma^2 + sum_k dz_k = sum_kl de_kl exactly (sum_kl w = 1)
        s3 = s[:, None, None]
        dmu_p = tl.sum(-s3 * de, 0)  # (K_P, DP)
        dlv_p = tl.sum(s3 * s3 * dm, 0)
        dlv_p = tl.reshape(v, (K_P, DP)) * dlv_p
        pm2 = tl.reshape(pmask, (K_P, DP))
        po2 = tl.reshape(poff, (K_P, DP)) + pid * (K * L * d)
        tl.store(dmu_part_ptr + po2, dmu_p.to(dmu_part_ptr.dtype.element_ty), mask=pm2)
        tl.store(dlv_part_ptr + po2, dlv_p.to(dlv_part_ptr.dtype.element_ty), mask=pm2)
        tl.store(dlp_part_ptr + pid * (K * L) + kk * L + l, tl.sum(dl, 0).to(dlp_part_ptr.dtype.element_ty),
                 mask=kmask)

    # ---- dx (and the per-row C, dZ that the launcher turns into dA with two GEMMs)
    if HAS_A:
        wsoff = rows64[:, None, None] * (K * d) + kk[None, :, None] * d + ii[None, None, :]
        wsmask = rm3 & (kmask[None, :, None] & (ii < d)[None, None, :])
        tl.store(c_ws_ptr + wsoff, cacc.to(c_ws_ptr.dtype.element_ty), mask=wsmask)
        tl.store(dz_ws_ptr + wsoff, dzacc.to(dz_ws_ptr.dtype.element_ty), mask=wsmask)
        dz2 = tl.reshape(dzacc, (BLOCK_B, KDP))
        for j0 in range(0, D, BLOCK_D):
            jj = j0 + tl.arange(0, BLOCK_D)
            jmask = jj < D
            omask = rmask[:, None] & jmask[None, :]
            att = tl.load(a_ptr + ck[:, None] * (D * d) + jj[None, :] * d + ci[:, None],
                          mask=cmask[:, None] & jmask[None, :], other=0.0).to(ACC)
            out = tl.dot(dz2, att, input_precision=DOT2_PREC, out_dtype=ACC)
            xt = tl.load(x_ptr + rows64[:, None] * D + jj[None, :], mask=omask, other=0.0).to(ACC)
            gt = tl.load(g_ptr + rows64[:, None] * D + jj[None, :], mask=omask, other=0.0).to(ACC)
            # sum_kl dl_kl (= g_lse analytically) as computed, so that its rounding cancels against the
            # sum_l dl_kl z_k / gamma^2 inside dZ (that cancellation is large for small gamma)
            out = out - (gt + dlsum[:, None] * xt) * inv_g2[:, None]
            tl.store(dx_ptr + rows64[:, None] * D + jj[None, :], out.to(dx_ptr.dtype.element_ty), mask=omask)
    else:
        out = tl.sum(dzacc, 1)
        tl.store(dx_ptr + rows64[:, None] * D + ii[None, :], out.to(dx_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (ii < D)[None, :])


# ----------------------------------------------------------------------------------------------- launchers
# Interpreter (CPU): few, big programs (the interpreter costs ~8 ms per program instance).
_INTERP_TILE = 32768  # max BLOCK_B * K_P * DP
_INTERP_MAX_BLOCK_B = 512
_INTERP_MAX_BLOCK_D = 256
# GPU: elements of one (BLOCK_B, K_P*DP) tile per program.  Chosen from the sm_90 ptxas reports of
# tools/triton_aot_check.py (no spills at K_P*DP = 32 and 128): float32/float64 tl.dot with input_precision="ieee"
# runs on FMA units and keeps whole operand rows per thread, so the fp32 tiles (and BLOCK_D) are smaller than the
# fp16/bf16 ones (tensor-core MMA).
_GPU_TILE = {"fp64": 512, "fp32": 1024, "half": 2048}
_GPU_BLOCK_D = {"fp64": 16, "fp32": 16, "half": 32}


def _prev_pow2(n: int) -> int:
    n = max(int(n), 1)
    return 1 << (n.bit_length() - 1)


def _dims(K: int, d: int, has_a: bool):
    """(K_P, DP): padded experts and latent dims; with A, K_P * DP >= 16 (tl.dot's minimum on a GPU)."""
    K_P, DP = next_pow2(K), next_pow2(d)
    if has_a:
        while K_P * DP < 16:
            DP *= 2
    return K_P, DP


def _gpu_config(B: int, D: int, kdp: int, dtype: torch.dtype, backward: bool):
    """(BLOCK_B, BLOCK_D, num_warps) on a GPU."""
    kind = "half" if dtype in (torch.float16, torch.bfloat16) else ("fp64" if dtype == torch.float64 else "fp32")
    block_b = min(128, max(16, _prev_pow2(_GPU_TILE[kind] // kdp)))
    block_b = min(block_b, max(16, next_pow2(B)))
    block_d = min(_GPU_BLOCK_D[kind], max(16, next_pow2(D)))
    tile = block_b * kdp
    num_warps = 16 if tile >= 8192 else (8 if backward or kdp >= 128 else 4)
    return block_b, block_d, num_warps


def _config(kernel, B: int, D: int, K: int, d: int, has_a: bool, dtype: torch.dtype, backward: bool):
    """(K_P, DP, BLOCK_B, BLOCK_D, num_warps) for these sizes."""
    K_P, DP = _dims(K, d, has_a)
    kdp = K_P * DP
    if is_interpreted(kernel):
        block_b = min(max(next_pow2(B), 16), _INTERP_MAX_BLOCK_B, max(16, _prev_pow2(_INTERP_TILE // kdp)))
        block_d = min(max(next_pow2(D), 16), _INTERP_MAX_BLOCK_D)
        return K_P, DP, block_b, block_d, 4
    return (K_P, DP) + _gpu_config(B, D, kdp, dtype, backward)


def _dot_in(kernel, dtype):
    """Operand dtype of the X A_cat / G A_cat products: the input dtype (tensor cores for fp16/bf16), except that
    the Triton 3.9 interpreter multiplies bfloat16 tl.dot operands as raw 16-bit integers (wrong results), so they
    are widened to float32 there (exact: every bfloat16 is a float32)."""
    if dtype == torch.bfloat16 and is_interpreted(kernel):
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


def _dot2_prec(dtype):
    return HALF_FP32_DOT_PRECISION if dtype in (torch.float16, torch.bfloat16) else FP32_DOT_PRECISION


def forward(x, s, gamma, A, mu, log_var, logpi, return_weights: bool = False):
    """Fused forward. x (B,D), s (B,), gamma (B,), A (K,D,d) or None (identity, D == d), mu / log_var (K,L,d),
    logpi (K,L) normalised; all contiguous, same dtype and device.
    Returns (score (B,D), lse (B,), w (B,K,L) if return_weights else an empty tensor), in x's dtype."""
    B, D = x.shape
    K, L, d = mu.shape
    has_a = A is not None
    if not has_a and d != D:
        raise ValueError(f"molr_mog_score (triton): A=None needs d == D, got d={d}, D={D}")
    score = torch.empty_like(x)
    lse = x.new_empty(B)
    w = x.new_empty(B, K, L) if return_weights else x.new_empty(0)
    if B == 0:
        return score, lse, w
    K_P, DP, BLOCK_B, BLOCK_D, num_warps = _config(_molr_mog_score_fwd_kernel, B, D, K, d, has_a, x.dtype, False)
    grid = (triton.cdiv(B, BLOCK_B),)
    with _device_ctx(x):
        _molr_mog_score_fwd_kernel[grid](
            x, s, gamma, A if has_a else x, mu, log_var, logpi,
            score, lse, w if return_weights else lse,
            B, D, K, L, d,
            HAS_A=has_a, RETURN_W=bool(return_weights),
            BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D, K_P=K_P, DP=DP,
            ACC=ACC_DTYPE[x.dtype], DOT_IN=_dot_in(_molr_mog_score_fwd_kernel, x.dtype),
            DOT2_PREC=_dot2_prec(x.dtype), num_warps=num_warps,
        )
    return score, lse, w


def backward(G, g_lse, g_w, x, s, gamma, A, mu, log_var, logpi, lse):
    """Fused backward: (dx (B,D), dA (K,D,d) or None, dmu (K,L,d), dlog_var (K,L,d), dlogpi (K,L)) in the inputs'
    dtype.  Deterministic (no atomics).  ``lse`` is accepted for the contract but not read: the kernel recomputes
    the softmax normaliser from Z (see the module docstring)."""
    B, D = x.shape
    K, L, d = mu.shape
    has_a = A is not None
    acc = acc_torch_dtype(x.dtype)
    if B == 0:
        dA = torch.zeros_like(A) if has_a else None
        return torch.empty_like(x), dA, torch.zeros_like(mu), torch.zeros_like(log_var), torch.zeros_like(logpi)
    K_P, DP, BLOCK_B, BLOCK_D, num_warps = _config(_molr_mog_score_bwd_kernel, B, D, K, d, has_a, x.dtype, True)
    P = triton.cdiv(B, BLOCK_B)
    dx = torch.empty_like(x)
    dmu_p = x.new_empty((P, K, L, d), dtype=acc)
    dlv_p = x.new_empty((P, K, L, d), dtype=acc)
    dlp_p = x.new_empty((P, K, L), dtype=acc)
    if has_a:
        c_ws = x.new_empty((B, K * d), dtype=acc)
        dz_ws = x.new_empty((B, K * d), dtype=acc)
    else:
        c_ws = dz_ws = dmu_p  # not touched (HAS_A=False)
    has_gw = g_w is not None
    with _device_ctx(x):
        _molr_mog_score_bwd_kernel[(P,)](
            G, g_lse, g_w if has_gw else G, x, s, gamma, A if has_a else x, mu, log_var, logpi,
            dx, c_ws, dz_ws, dmu_p, dlv_p, dlp_p,
            B, D, K, L, d,
            HAS_A=has_a, HAS_GW=has_gw,
            BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D, K_P=K_P, DP=DP,
            ACC=ACC_DTYPE[x.dtype], DOT_IN=_dot_in(_molr_mog_score_bwd_kernel, x.dtype),
            DOT2_PREC=_dot2_prec(x.dtype), num_warps=num_warps,
        )
    dA = None
    if has_a:  # dA_k = sum_rows G c_k^T + x dz_k^T: two deterministic GEMMs on the (B, K*d) rows the kernel wrote
        dA_cat = torch.mm(G.t().to(acc), c_ws)
        dA_cat.addmm_(x.t().to(acc), dz_ws)
        dA = dA_cat.view(D, K, d).permute(1, 0, 2).to(A.dtype).contiguous()
    return dx, dA, dmu_p.sum(0).to(mu.dtype), dlv_p.sum(0).to(log_var.dtype), dlp_p.sum(0).to(logpi.dtype)


def _device_ctx(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------- AOT specs
_FWD_PTRS = ("x_ptr", "s_ptr", "gamma_ptr", "a_ptr", "mu_ptr", "lv_ptr", "logpi_ptr", "score_ptr", "lse_ptr", "w_ptr")
_BWD_PTRS = ("g_ptr", "glse_ptr", "gw_ptr", "x_ptr", "s_ptr", "gamma_ptr", "a_ptr", "mu_ptr", "lv_ptr", "logpi_ptr",
             "dx_ptr")
_BWD_ACC_PTRS = ("c_ws_ptr", "dz_ws_ptr", "dmu_part_ptr", "dlv_part_ptr", "dlp_part_ptr")
_SCALARS = {"B": "i32", "D": "i32", "K": "i32", "L": "i32", "d": "i32"}


def _aot_spec(which: str, dtype: torch.dtype, B: int, D: int, K: int, d: int, has_a: bool, flag: bool = True):
    """The spec the GPU launcher would compile for these sizes (flag: RETURN_W / HAS_GW)."""
    K_P, DP = _dims(K, d, has_a)
    block_b, block_d, warps = _gpu_config(B, D, K_P * DP, dtype, which == "bwd")
    cexp = {"HAS_A": has_a, "BLOCK_B": block_b, "BLOCK_D": block_d, "K_P": K_P, "DP": DP,
            "ACC": ACC_DTYPE[dtype], "DOT_IN": _dot_in(None, dtype), "DOT2_PREC": _dot2_prec(dtype)}
    p = "*" + TRITON_TYPE[dtype]
    if which == "fwd":
        kernel = _molr_mog_score_fwd_kernel
        cexp["RETURN_W"] = flag
        ptrs = {n: p for n in _FWD_PTRS}
    else:
        kernel = _molr_mog_score_bwd_kernel
        cexp["HAS_GW"] = flag
        ptrs = {n: p for n in _BWD_PTRS}
        ptrs.update({n: "*" + TRITON_TYPE[acc_torch_dtype(dtype)] for n in _BWD_ACC_PTRS})
    return kernel, aot_signature(kernel, ptrs, _SCALARS, cexp), cexp, {"num_warps": warps}


def _aot_specs():
    """Every dtype at a typical shape (K=4, d=8: K_P*DP = 32); float32 also for the identity (A=None), a tiny
    latent (K=3, d=1: padded to 16 columns), a wide one (K=8, d=16: 128 columns) and a very wide one (K=8, d=64:
    512 columns, spills: correct but slow); float16 wide."""
    specs = []
    shapes = [(dt, 4096, 64, 4, 8, True) for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)]
    shapes += [(torch.float32, 4096, 32, 4, 32, False), (torch.float32, 4096, 2, 3, 1, True),
               (torch.float32, 4096, 256, 8, 16, True), (torch.float16, 4096, 256, 8, 16, True),
               (torch.float32, 4096, 1024, 8, 64, True)]
    for which in ("fwd", "bwd"):
        for dtype, B, D, K, d, has_a in shapes:
            specs.append(_aot_spec(which, dtype, B, D, K, d, has_a))
    specs.append(_aot_spec("fwd", torch.float32, 4096, 64, 4, 8, True, flag=False))
    specs.append(_aot_spec("bwd", torch.float32, 4096, 64, 4, 8, True, flag=False))
    return specs


AOT_SPECS = _aot_specs()
