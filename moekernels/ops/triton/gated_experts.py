"""Triton kernels for ``gated_experts`` (DESIGN.md section 3.3): kernel -> launcher.

Kernel contract (shared with the cpu and cuda backends; ``moekernels/ops/gated_experts.py`` validates and makes
everything contiguous before calling):

    forward(h, Ws, bs, gWs, gbs, n_residual) -> (out (B, O), gate (B, E), saved)
    backward(g_out, g_gate or None, h, Ws, bs, gWs, gbs, n_residual, saved, gate) -> (dh, dWs, dbs, dgWs, dgbs)

    h (B, in); Ws[l] (E, in_l, out_l), bs[l] (E, out_l)  (L expert layers, E experts with identical shapes);
    gWs[j] (in_j, out_j), gbs[j] (out_j,)  (J gate layers, last out_j = E (softmax) or 1 with E == 2 (sigmoid)).
    expert: a_0 = h W_0 + b_0 ; a_l = a_{l-1} + relu(a_{l-1}) W_l + b_l (1 <= l <= n_residual) ;
            a_l = relu(a_{l-1}) W_l + b_l (the rest) ;  y_e = a_{L-1}
    gate:   z_0 = h gW_0 + gb_0 ; z_j = relu(z_{j-1}) gW_j + gb_j ; gate = softmax(z_{J-1}) or (s, 1 - s), s = sigmoid
    out = sum_e gate_e y_e
    saved = [a_0, ..., a_{L-1} (= y), z_0, ..., z_{J-1} (= the logits)]: every pre-activation, in the input dtype,
    (B, E, out_l) for the experts (experts side by side in a row, as the op module states) and (B, out_j) for the gate.

Design (GPU; the small-MLP case is launch-bound, so the aim is few launches with all elementwise work fused):
  * ``_gated_linear_kernel``: one grouped GEMM launch per layer, grid (row tiles x column tiles, E): every expert's
    layer in one launch (E in the grid; layer 0 reads the shared h with an expert stride of 0, so h is never
    copied E times), with relu fused on the operand load (relu(a_{l-1}) is never materialised), bias and the
    residual add in the epilogue.  The gate's hidden layers use the same kernel with one group.
  * ``_gated_head_fwd_kernel``: one launch for the last layer of every expert + the gate's last layer + the gate
    nonlinearity (softmax over E, or the E == 2 sigmoid) + the mix out = sum_e gate_e y_e, per row tile: the
    expert outputs y_e (saved for the backward) are written once and the mix never leaves registers.
  * A DualDiff net (384 -> 256, 3 residual 256 -> 256, 256 -> 2; gate with one hidden layer) is 6 forward launches,
    against ~20 kernels for the eager stacked-bmm form (baddbmm, relu, add per layer, gate, sigmoid, mul, sum).
    Why not one persistent kernel keeping a row block's activations in SRAM: each layer's weights (256 x 256 x E
    fp32 = 512 KiB for E = 2) do not fit shared memory, so a persistent kernel would stream every weight matrix
    from L2 for every row block anyway, serialise the layers inside one program (no inter-layer parallelism
    beyond the row blocks), and need a hand-written tile loop over the 256-wide hidden state; the per-layer
    grouped GEMMs keep the tiles standard and reach the same launch count order (L + 2 instead of 1).
  Backward (fused parts in Triton, weight gradients in torch):
  * ``_gated_mix_bwd_kernel``: dgate_e = g_out . y_e (+ g_gate), dy_e = gate_e g_out, and dlogits through the
    softmax (gate * (dgate - sum gate dgate)) or the sigmoid ((dgate_0 - dgate_1) s (1 - s)) in one launch.
  * ``_gated_linear_kernel`` again for the data gradients: da_{l-1} = [da_l +] relu'(a_{l-1}) * (da_l W_l^T)
    (W^T through strides, no transpose copy) with the relu mask and the residual add in the epilogue; the same
    epilogue writes relu(a_{l-1}) (it has the tile loaded) for the weight gradient.  dh sums the E experts'
    da_0 W_0[e]^T inside one launch (the expert loop is part of the reduction) and adds dz_0 gW_0^T in a second.
  * Weight gradients dW_l = relu(a_{l-1})^T da_l and db_l = sum_rows da_l: torch bmm / sum (cuBLAS) on the
    tensors the kernels wrote (h^T da_0 for layer 0).

Precision: float32 inputs use tl.dot with input_precision="ieee" (no TF32: the tests compare with the float64
reference), accumulation in float32; float16/bfloat16 feed tensor cores with float32 accumulation (activations
are stored in the input dtype, as the eager form does); float64 accumulates in float64 (interpreter / gradcheck).

Block sizes: under TRITON_INTERPRET=1 (CPU) big tiles and few programs (~8 ms per program instance); on a GPU
fixed tiles per dtype (no autotuning), every tl.dot dimension a power of two >= 16.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from moekernels.ops.triton._common import (ACC_DTYPE, TRITON_TYPE, aot_signature, is_interpreted,
                                           next_pow2)

__all__ = ["forward", "backward", "AOT_SPECS", "_gated_linear_kernel", "_gated_head_fwd_kernel",
           "_gated_mix_bwd_kernel"]


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _gated_linear_kernel(
    X, W, BIAS, MASK, Y, U,
    M, N, K, G,
    sxe, sxm, sxk, swe, swk, swn, sbe, sye, sym,
    PRE_RELU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, STORE_U: tl.constexpr,
    RESIDUAL: tl.constexpr, ACCUM: tl.constexpr, GROUP_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr, DOT_IN: tl.constexpr,
):
    """Y[e] = epilogue(pre(X[e]) @ W[e]) for group e = program_id(1); Y, MASK, U share one layout: element (e, m, n)
    at e * sye + m * sym + n (the experts' (B, E, N) row-major layout: sye = N, sym = E * N).

    pre = relu when PRE_RELU.  Epilogue, in order: + BIAS[e] ; * (MASK[e] > 0) (and U[e] = relu(MASK[e]) when
    STORE_U) ; + X[e] (RESIDUAL, needs K == N) ; + Y (ACCUM).  GROUP_SUM: one output, the G groups summed inside
    the reduction (Y = sum_g pre(X[g]) @ W[g]).  X[e] / W[e] are addressed through strides (an expert stride of 0
    shares one operand across the groups; W^T is W with swapped strides)."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pm = pid // num_n
    pn = pid % num_n
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if GROUP_SUM:
        n_groups = G
    else:
        n_groups = 1
    for g in range(0, n_groups):
        ge = (e + g).to(tl.int64)
        xb = X + ge * sxe
        wb = W + ge * swe
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(xb + rm64[:, None] * sxm + kk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            x = x.to(DOT_IN)  # relu in DOT_IN: the interpreter holds bfloat16 as raw 16-bit integers
            if PRE_RELU:
                x = tl.maximum(x, 0.0)
            w = tl.load(wb + kk[:, None] * swk + rn[None, :] * swn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(x, w.to(DOT_IN), acc, input_precision="ieee", out_dtype=ACC)
    e64 = e.to(tl.int64)
    mn_ok = m_ok[:, None] & n_ok[None, :]
    yoff = e64 * sye + rm64[:, None] * sym + rn[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + e64 * sbe + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    if HAS_MASK:
        mk = tl.load(MASK + yoff, mask=mn_ok, other=0.0).to(ACC)
        acc = tl.where(mk > 0, acc, 0.0)
        if STORE_U:
            tl.store(U + yoff, tl.maximum(mk, 0.0).to(U.dtype.element_ty), mask=mn_ok)
    if RESIDUAL:
        acc += tl.load(X + e64 * sxe + rm64[:, None] * sxm + rn[None, :] * sxk, mask=mn_ok, other=0.0).to(ACC)
    if ACCUM:
        acc += tl.load(Y + yoff, mask=mn_ok, other=0.0).to(ACC)
    tl.store(Y + yoff, acc.to(Y.dtype.element_ty), mask=mn_ok)


@triton.jit
def _gated_head_fwd_kernel(
    XE, WE, BE, XG, WG, BG,  # expert last-layer input: (e, b, k) at e sxe + b sxm + k, (E, KE, O), (E, O);
                             # gate last-layer input (B, KG), (KG, NL), (NL,)
    Y, LOGIT, GATE, OUT,  # outputs: y (B, E, O), logits (B, NL), gate (B, E), out (B, O)
    B, KE, O, E, KG, NL, sxe, sxm,
    E_PRE_RELU: tl.constexpr, E_RESIDUAL: tl.constexpr, G_PRE_RELU: tl.constexpr, SIGMOID: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_KE: tl.constexpr, O_P: tl.constexpr, BLOCK_KG: tl.constexpr, GP: tl.constexpr,
    ACC: tl.constexpr, DOT_IN: tl.constexpr,
):
    """Last layer of every expert + last gate layer + gate nonlinearity + mix, for one block of rows."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    r_ok = rows < B
    r64 = rows.to(tl.int64)
    cg = tl.arange(0, GP)
    co = tl.arange(0, O_P)
    o_ok = co < O
    # ---- gate logits (BLOCK_B, GP)
    logit = tl.zeros((BLOCK_B, GP), dtype=ACC)
    rkg = tl.arange(0, BLOCK_KG)
    for k0 in range(0, KG, BLOCK_KG):
        kk = k0 + rkg
        k_ok = kk < KG
        x = tl.load(XG + r64[:, None] * KG + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        x = x.to(DOT_IN)  # relu in DOT_IN: the interpreter holds bfloat16 as raw 16-bit integers
        if G_PRE_RELU:
            x = tl.maximum(x, 0.0)
        w = tl.load(WG + kk[:, None] * NL + cg[None, :], mask=k_ok[:, None] & (cg < NL)[None, :], other=0.0)
        logit = tl.dot(x, w.to(DOT_IN), logit, input_precision="ieee", out_dtype=ACC)
    logit += tl.load(BG + cg, mask=cg < NL, other=0.0).to(ACC)[None, :]
    tl.store(LOGIT + r64[:, None] * NL + cg[None, :], logit.to(LOGIT.dtype.element_ty),
             mask=r_ok[:, None] & (cg < NL)[None, :])
    if SIGMOID:  # E == 2, one logit: gate = (sigmoid(l), sigmoid(-l)) (1 - s computed without cancellation)
        l0 = tl.sum(tl.where(cg[None, :] == 0, logit, 0.0), 1)
        s0 = 1.0 / (1.0 + tl.exp(-l0))
        s1 = 1.0 / (1.0 + tl.exp(l0))
        gate = tl.where(cg[None, :] == 0, s0[:, None], tl.where(cg[None, :] == 1, s1[:, None], 0.0))
    else:  # softmax over the E = NL logits (max-shifted)
        lm = tl.where((cg < NL)[None, :], logit, float("-inf"))
        mx = tl.max(lm, 1)
        p = tl.exp(lm - mx[:, None])
        gate = p / tl.sum(p, 1)[:, None]
    tl.store(GATE + r64[:, None] * E + cg[None, :], gate.to(GATE.dtype.element_ty),
             mask=r_ok[:, None] & (cg < E)[None, :])
    # ---- every expert's last layer and the mix
    out = tl.zeros((BLOCK_B, O_P), dtype=ACC)
    rke = tl.arange(0, BLOCK_KE)
    for e in range(0, E):
        xb = XE + e * sxe
        y = tl.zeros((BLOCK_B, O_P), dtype=ACC)
        for k0 in range(0, KE, BLOCK_KE):
            kk = k0 + rke
            k_ok = kk < KE
            x = tl.load(xb + r64[:, None] * sxm + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            x = x.to(DOT_IN)  # relu in DOT_IN: the interpreter holds bfloat16 as raw 16-bit integers
            if E_PRE_RELU:
                x = tl.maximum(x, 0.0)
            w = tl.load(WE + e * KE * O + kk[:, None] * O + co[None, :], mask=k_ok[:, None] & o_ok[None, :],
                        other=0.0)
            y = tl.dot(x, w.to(DOT_IN), y, input_precision="ieee", out_dtype=ACC)
        y += tl.load(BE + e * O + co, mask=o_ok, other=0.0).to(ACC)[None, :]
        ro_ok = r_ok[:, None] & o_ok[None, :]
        if E_RESIDUAL:  # KE == O
            y += tl.load(xb + r64[:, None] * sxm + co[None, :], mask=ro_ok, other=0.0).to(ACC)
        tl.store(Y + r64[:, None] * (E * O) + e * O + co[None, :], y.to(Y.dtype.element_ty), mask=ro_ok)
        # the mix uses y as stored (its rounding in fp16/bf16), so out is consistent with the saved y
        y = y.to(Y.dtype.element_ty).to(ACC)
        ge = tl.sum(tl.where(cg[None, :] == e, gate, 0.0), 1)
        out += ge[:, None] * y
    tl.store(OUT + r64[:, None] * O + co[None, :], out.to(OUT.dtype.element_ty), mask=r_ok[:, None] & o_ok[None, :])


@triton.jit
def _gated_mix_bwd_kernel(
    GOUT, GGATE, Y, GATE,  # (B, O), (B, E) or unused, (B, E, O), (B, E)
    DY, DLOGIT,  # outputs (B, E, O), (B, NL)
    B, O, E, NL,
    HAS_GGATE: tl.constexpr, SIGMOID: tl.constexpr,
    BLOCK_B: tl.constexpr, O_P: tl.constexpr, GP: tl.constexpr, ACC: tl.constexpr,
):
    """dy_e = gate_e g_out ; dgate_e = g_out . y_e + g_gate_e ; dlogits through the softmax / sigmoid."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    r_ok = rows < B
    r64 = rows.to(tl.int64)
    cg = tl.arange(0, GP)
    co = tl.arange(0, O_P)
    ro_ok = r_ok[:, None] & (co < O)[None, :]
    re_ok = r_ok[:, None] & (cg < E)[None, :]
    gout = tl.load(GOUT + r64[:, None] * O + co[None, :], mask=ro_ok, other=0.0).to(ACC)
    gate = tl.load(GATE + r64[:, None] * E + cg[None, :], mask=re_ok, other=0.0).to(ACC)
    if HAS_GGATE:
        dgate = tl.load(GGATE + r64[:, None] * E + cg[None, :], mask=re_ok, other=0.0).to(ACC)
    else:
        dgate = tl.zeros((BLOCK_B, GP), dtype=ACC)
    for e in range(0, E):
        yoff = r64[:, None] * (E * O) + e * O + co[None, :]
        y = tl.load(Y + yoff, mask=ro_ok, other=0.0).to(ACC)
        ge = tl.sum(tl.where(cg[None, :] == e, gate, 0.0), 1)
        tl.store(DY + yoff, (ge[:, None] * gout).to(DY.dtype.element_ty), mask=ro_ok)
        dgate += tl.where(cg[None, :] == e, tl.sum(gout * y, 1)[:, None], 0.0)
    if SIGMOID:  # gate = (s, 1 - s): dl = (dgate_0 - dgate_1) s (1 - s)
        g0 = tl.sum(tl.where(cg[None, :] == 0, gate, 0.0), 1)
        g1 = tl.sum(tl.where(cg[None, :] == 1, gate, 0.0), 1)
        d0 = tl.sum(tl.where(cg[None, :] == 0, dgate, 0.0), 1)
        d1 = tl.sum(tl.where(cg[None, :] == 1, dgate, 0.0), 1)
        dl = tl.where(cg[None, :] == 0, ((d0 - d1) * g0 * g1)[:, None], 0.0)
    else:
        dl = gate * (dgate - tl.sum(gate * dgate, 1)[:, None])
    tl.store(DLOGIT + r64[:, None] * NL + cg[None, :], dl.to(DLOGIT.dtype.element_ty),
             mask=r_ok[:, None] & (cg < NL)[None, :])


# ----------------------------------------------------------------------------------------------- block configs
# Interpreter (CPU): few big programs.
_INTERP_MAX_BM = 256
_INTERP_MAX_BN = 256
_INTERP_MAX_BK = 512
# GPU (fixed per dtype kind; from the sm_90 ptxas reports of tools/triton_aot_check.py): (BM, BN, BK, warps, stages)
# 4 warps spill with the epilogue tiles (mask, residual) live: 8 warps
_GPU_LINEAR = {"fp32": (64, 64, 32, 8, 3), "half": (128, 64, 32, 8, 3), "fp64": (32, 32, 16, 4, 2)}
# the masked (data-gradient) half config: 128 x 64 spills with the mask, U and residual tiles live
_GPU_LINEAR_HALF_MASKED = (64, 64, 32, 8, 3)
# head kernel: (BLOCK_B, BLOCK_K, warps)
_GPU_HEAD = {"fp32": (64, 32, 8), "half": (64, 64, 4), "fp64": (32, 16, 4)}
_GPU_MIX_BLOCK_B = 128


def _kind(dtype):
    return "half" if dtype in (torch.float16, torch.bfloat16) else ("fp64" if dtype == torch.float64 else "fp32")


def _dot_in(interpreted: bool, dtype):
    """tl.dot operand dtype: the input dtype (tensor cores for float16/bfloat16 on a GPU), except float16/bfloat16
    under the interpreter, widened to float32 there (exact): Triton 3.9's interpreter multiplies bfloat16 dot
    operands as raw 16-bit integers and float16 ones with a float16 numpy matmul (float16 accumulation), neither
    what a GPU does."""
    if dtype in (torch.float16, torch.bfloat16) and interpreted:
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, next_pow2(n))


def _linear_config(interpreted, dtype, M, N, K, masked=False):
    if interpreted:
        return (min(_p2(M), _INTERP_MAX_BM), min(_p2(N), _INTERP_MAX_BN), min(_p2(K), _INTERP_MAX_BK), 4, 1)
    kind = _kind(dtype)
    bm, bn, bk, w, s = _GPU_LINEAR_HALF_MASKED if (kind == "half" and masked) else _GPU_LINEAR[kind]
    return (bm, min(bn, _p2(N)), min(bk, _p2(K)), w, s)


def _head_config(interpreted, dtype, B, KE, KG):
    """(BLOCK_B, BLOCK_KE, BLOCK_KG, warps)."""
    if interpreted:
        return min(_p2(B), _INTERP_MAX_BM), min(_p2(KE), _INTERP_MAX_BK), min(_p2(KG), _INTERP_MAX_BK), 4
    bb, bk, w = _GPU_HEAD[_kind(dtype)]
    return bb, min(bk, _p2(KE)), min(bk, _p2(KG)), w


def _device_ctx(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _linear(X, W, bias, Y, *, M, N, K, groups, sx, sw, sy, sbe=0, pre_relu=False, mask=None, U=None,
            residual=False, accum=False, group_sum=False):
    """Launch ``_gated_linear_kernel``: sx = (sxe, sxm, sxk), sw = (swe, swk, swn), sy = (sye, sym) element
    strides (Y, mask and U share sy, unit column stride)."""
    interp = is_interpreted(_gated_linear_kernel)
    bm, bn, bk, warps, stages = _linear_config(interp, Y.dtype, M, N, K, masked=mask is not None)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), 1 if group_sum else groups)
    _gated_linear_kernel[grid](
        X, W, bias if bias is not None else Y, mask if mask is not None else Y, Y, U if U is not None else Y,
        M, N, K, groups,
        sx[0], sx[1], sx[2], sw[0], sw[1], sw[2], sbe, sy[0], sy[1],
        PRE_RELU=pre_relu, HAS_BIAS=bias is not None, HAS_MASK=mask is not None, STORE_U=U is not None,
        RESIDUAL=residual, ACCUM=accum, GROUP_SUM=group_sum,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ACC=ACC_DTYPE[Y.dtype], DOT_IN=_dot_in(interp, Y.dtype),
        num_warps=warps, num_stages=stages,
    )


def _is_residual(l: int, n_residual: int) -> bool:
    return 1 <= l <= n_residual


def _gate_mode(E: int, NL: int) -> bool:
    """True: sigmoid gate (E == 2, one logit); False: softmax over NL == E logits."""
    if NL == 1 and E == 2:
        return True
    if NL != E:
        raise ValueError(f"gated_experts (triton): the gate's last layer must have E={E} outputs (or 1 with E == 2), "
                         f"got {NL}")
    return False


# ----------------------------------------------------------------------------------------------- launchers
def forward(h, Ws, bs, gWs, gbs, n_residual: int):
    """Fused forward: (out (B, O), gate (B, E), saved = [a_0..a_{L-1} (B, E, out_l), z_0..z_{J-1} (B, out_j)]),
    all in h's dtype."""
    B, IN = h.shape
    L, J = len(Ws), len(gWs)
    E = Ws[0].shape[0]
    O = Ws[-1].shape[2]
    NL = gWs[-1].shape[1]
    sigmoid = _gate_mode(E, NL)
    out = h.new_empty(B, O)
    gate = h.new_empty(B, E)
    saved = [h.new_empty(B, E, W.shape[2]) for W in Ws] + [h.new_empty(B, W.shape[1]) for W in gWs]
    if B == 0:
        return out, gate, saved
    interp = is_interpreted(_gated_linear_kernel)
    with _device_ctx(h):
        # expert hidden layers: one grouped launch each (layer 0 reads the shared h: expert stride 0)
        x, K, sx = h, IN, (0, IN, 1)
        for l in range(L - 1):
            W = Ws[l]
            N = W.shape[2]
            _linear(x, W, bs[l], saved[l], M=B, N=N, K=K, groups=E, sx=sx, sw=(K * N, N, 1), sy=(N, E * N), sbe=N,
                    pre_relu=l > 0, residual=_is_residual(l, n_residual))
            x, K, sx = saved[l], N, (N, E * N, 1)
        xe, ke, sxe = x, K, sx
        # gate hidden layers
        x, K = h, IN
        for j in range(J - 1):
            W = gWs[j]
            N = W.shape[1]
            _linear(x, W, gbs[j], saved[L + j], M=B, N=N, K=K, groups=1, sx=(0, K, 1), sw=(0, N, 1), sy=(0, N),
                    pre_relu=j > 0)
            x, K = saved[L + j], N
        # last layers + gate nonlinearity + mix
        bb, bke, bkg, warps = _head_config(interp, h.dtype, B, ke, K)
        _gated_head_fwd_kernel[(triton.cdiv(B, bb),)](
            xe, Ws[-1], bs[-1], x, gWs[-1], gbs[-1],
            saved[L - 1], saved[L + J - 1], gate, out,
            B, ke, O, E, K, NL, sxe[0], sxe[1],
            E_PRE_RELU=L > 1, E_RESIDUAL=_is_residual(L - 1, n_residual), G_PRE_RELU=J > 1, SIGMOID=sigmoid,
            BLOCK_B=bb, BLOCK_KE=bke, O_P=_p2(O), BLOCK_KG=bkg, GP=_p2(max(E, NL)),
            ACC=ACC_DTYPE[h.dtype], DOT_IN=_dot_in(interp, h.dtype), num_warps=warps,
        )
    return out, gate, saved


def backward(g_out, g_gate, h, Ws, bs, gWs, gbs, n_residual: int, saved, gate):
    """Fused backward: (dh, dWs, dbs, dgWs, dgbs) in the inputs' dtype.  g_gate may be None (unused gate)."""
    B, IN = h.shape
    L, J = len(Ws), len(gWs)
    E = Ws[0].shape[0]
    O = Ws[-1].shape[2]
    NL = gWs[-1].shape[1]
    sigmoid = _gate_mode(E, NL)
    if B == 0:
        return (torch.zeros_like(h), [torch.zeros_like(W) for W in Ws], [torch.zeros_like(b) for b in bs],
                [torch.zeros_like(W) for W in gWs], [torch.zeros_like(b) for b in gbs])
    g_out = g_out.contiguous().to(h.dtype)
    if g_gate is not None:
        g_gate = g_gate.contiguous().to(h.dtype)
    dWs, dbs = [None] * L, [None] * L
    dgWs, dgbs = [None] * J, [None] * J
    dh = torch.empty_like(h)
    with _device_ctx(h):
        dy = torch.empty_like(saved[L - 1])
        dlogit = h.new_empty(B, NL)
        bb = _mix_block_b(B)
        _gated_mix_bwd_kernel[(triton.cdiv(B, bb),)](
            g_out, g_gate if g_gate is not None else gate, saved[L - 1], gate, dy, dlogit,
            B, O, E, NL, HAS_GGATE=g_gate is not None, SIGMOID=sigmoid,
            BLOCK_B=bb, O_P=_p2(O, 2), GP=_p2(max(E, NL), 2), ACC=ACC_DTYPE[h.dtype], num_warps=4,
        )
        # experts, layers L-1 .. 1: data grads with the relu mask / residual fused (and relu(a_{l-1}) written),
        # weight grads by bmm on the (B, E, .) tensors (strided batches, no copies)
        da = dy
        for l in range(L - 1, 0, -1):
            W = Ws[l]
            K, N = W.shape[1], W.shape[2]  # the layer maps K -> N; its data grad maps N -> K
            a_prev = saved[l - 1]
            da_prev = torch.empty_like(a_prev)
            u = torch.empty_like(a_prev)
            _linear(da, W, None, da_prev, M=B, N=K, K=N, groups=E, sx=(N, E * N, 1), sw=(K * N, 1, N),
                    sy=(K, E * K), mask=a_prev, U=u, residual=_is_residual(l, n_residual))
            dWs[l] = torch.bmm(u.permute(1, 2, 0), da.transpose(0, 1))
            dbs[l] = da.sum(0)
            da = da_prev
        N0 = Ws[0].shape[2]
        dWs[0] = torch.mm(h.t(), da.view(B, E * N0)).view(IN, E, N0).permute(1, 0, 2).contiguous()
        dbs[0] = da.sum(0)
        # dh = sum_e da_0[e] W_0[e]^T: the expert loop is part of the reduction of one launch
        _linear(da, Ws[0], None, dh, M=B, N=IN, K=N0, groups=E, sx=(N0, E * N0, 1), sw=(IN * N0, 1, N0),
                sy=(0, IN), group_sum=True)
        # gate, layers J-1 .. 1, then dh += dz_0 gW_0^T
        dz = dlogit
        for j in range(J - 1, 0, -1):
            W = gWs[j]
            K, N = W.shape
            z_prev = saved[L + j - 1]
            dz_prev = torch.empty_like(z_prev)
            u = torch.empty_like(z_prev)
            _linear(dz, W, None, dz_prev, M=B, N=K, K=N, groups=1, sx=(0, N, 1), sw=(0, 1, N), sy=(0, K),
                    mask=z_prev, U=u)
            dgWs[j] = torch.mm(u.t(), dz)
            dgbs[j] = dz.sum(0)
            dz = dz_prev
        dgWs[0] = torch.mm(h.t(), dz)
        dgbs[0] = dz.sum(0)
        G0 = gWs[0].shape[1]
        _linear(dz, gWs[0], None, dh, M=B, N=IN, K=G0, groups=1, sx=(0, G0, 1), sw=(0, 1, G0), sy=(0, IN),
                accum=True)
    return dh, dWs, dbs, dgWs, dgbs


def _mix_block_b(B: int) -> int:
    if is_interpreted(_gated_mix_bwd_kernel):
        return min(_p2(B), 1024)
    return _GPU_MIX_BLOCK_B


# ----------------------------------------------------------------------------------------------- AOT specs
_LINEAR_PTRS = ("X", "W", "BIAS", "MASK", "Y", "U")
_LINEAR_SCALARS = {n: "i32" for n in ("M", "N", "K", "G", "sxe", "sxm", "sxk", "swe", "swk", "swn", "sbe", "sye",
                                      "sym")}


def _linear_spec(dtype, M, N, K, **flags):
    bm, bn, bk, warps, stages = _linear_config(False, dtype, M, N, K, masked=flags.get("HAS_MASK", False))
    cexp = {"PRE_RELU": False, "HAS_BIAS": False, "HAS_MASK": False, "STORE_U": False, "RESIDUAL": False,
            "ACCUM": False, "GROUP_SUM": False}
    cexp.update(flags)
    cexp.update({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "ACC": ACC_DTYPE[dtype], "DOT_IN": _dot_in(False, dtype)})
    p = "*" + TRITON_TYPE[dtype]
    sig = aot_signature(_gated_linear_kernel, {n: p for n in _LINEAR_PTRS}, _LINEAR_SCALARS, cexp)
    return _gated_linear_kernel, sig, cexp, {"num_warps": warps, "num_stages": stages}


def _head_spec(dtype, B, KE, O, E, KG, NL, **flags):
    bb, bke, bkg, warps = _head_config(False, dtype, B, KE, KG)
    cexp = {"E_PRE_RELU": True, "E_RESIDUAL": False, "G_PRE_RELU": True, "SIGMOID": NL == 1}
    cexp.update(flags)
    cexp.update({"BLOCK_B": bb, "BLOCK_KE": bke, "O_P": _p2(O), "BLOCK_KG": bkg, "GP": _p2(max(E, NL)),
                 "ACC": ACC_DTYPE[dtype], "DOT_IN": _dot_in(False, dtype)})
    p = "*" + TRITON_TYPE[dtype]
    scal = {n: "i32" for n in ("B", "KE", "O", "E", "KG", "NL", "sxe", "sxm")}
    sig = aot_signature(_gated_head_fwd_kernel, {n: p for n in ("XE", "WE", "BE", "XG", "WG", "BG", "Y", "LOGIT",
                                                                "GATE", "OUT")}, scal, cexp)
    return _gated_head_fwd_kernel, sig, cexp, {"num_warps": warps}


def _mix_spec(dtype, O, E, NL, has_ggate=True):
    cexp = {"HAS_GGATE": has_ggate, "SIGMOID": NL == 1, "BLOCK_B": _GPU_MIX_BLOCK_B, "O_P": _p2(O, 2),
            "GP": _p2(max(E, NL), 2), "ACC": ACC_DTYPE[dtype]}
    p = "*" + TRITON_TYPE[dtype]
    sig = aot_signature(_gated_mix_bwd_kernel, {n: p for n in ("GOUT", "GGATE", "Y", "GATE", "DY", "DLOGIT")},
                        {n: "i32" for n in ("B", "O", "E", "NL")}, cexp)
    return _gated_mix_bwd_kernel, sig, cexp, {"num_warps": 4}


def _aot_specs():
    """The DualDiff shapes (384 -> 256, residual 256 -> 256, 256 -> 2, gate 384 -> 128 -> 1, E = 2) in every GPU
    dtype: forward layer 0 / residual layer / gate hidden layer, head; backward data grads (masked residual,
    masked plain, dh group sum, dh accumulate), mix backward; plus a softmax gate with E = 4."""
    specs = []
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        B = 10000
        specs.append(_linear_spec(dt, B, 256, 384, HAS_BIAS=True))  # layer 0
        specs.append(_linear_spec(dt, B, 256, 256, HAS_BIAS=True, PRE_RELU=True, RESIDUAL=True))  # residual
        specs.append(_linear_spec(dt, B, 128, 256, HAS_BIAS=True, PRE_RELU=True))  # plain hidden / gate
        specs.append(_head_spec(dt, B, 256, 2, 2, 128, 1))
        specs.append(_linear_spec(dt, B, 256, 256, HAS_MASK=True, STORE_U=True, RESIDUAL=True))  # bwd residual
        specs.append(_linear_spec(dt, B, 256, 16, HAS_MASK=True, STORE_U=True))  # bwd through a narrow layer
        specs.append(_linear_spec(dt, B, 384, 256, GROUP_SUM=True))  # dh over the experts
        specs.append(_linear_spec(dt, B, 384, 128, ACCUM=True))  # dh += dz0 gW0^T
        specs.append(_mix_spec(dt, 2, 2, 1))
    specs.append(_head_spec(torch.float32, 4096, 64, 3, 4, 32, 4, E_RESIDUAL=False))  # softmax gate, E = 4
    specs.append(_mix_spec(torch.float32, 3, 4, 4, has_ggate=False))
    specs.append(_linear_spec(torch.float64, 4096, 64, 64, HAS_BIAS=True, PRE_RELU=True, RESIDUAL=True))
    specs.append(_head_spec(torch.float64, 4096, 64, 2, 2, 32, 1))
    return specs


AOT_SPECS = _aot_specs()
