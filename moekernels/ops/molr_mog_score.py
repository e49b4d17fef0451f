"""The fused MoLR-MoG score (DESIGN.md section 3.1): the exact score, posterior weights and log-density of the
noised mixture of low-rank mixtures of Gaussians, in one pass, without materialising B x K x L x d.

Noised distribution: x_t = s x0 + gamma eps, x0 = A_k z, z ~ N(mu_kl, diag(exp(log_var_kl))) with probability
pi_kl = softmax(log_pi)_kl. Per row:

    z_k   = A_k^T x ;  e_kl = z_k - s mu_kl ;  m_kl = s^2 exp(log_var_kl) + gamma^2
    l_kl  = logpi_kl - 1/2 sum_i [log m_kl,i + e_kl,i^2 / m_kl,i] + ||z_k||^2/(2 gamma^2)
            - (D - d)/2 log gamma^2 - ||x||^2/(2 gamma^2) - D/2 log(2 pi)
    lse   = logsumexp_kl l_kl = log p_t(x) ;  w_kl = exp(l_kl - lse)
    score = -x/gamma^2 + sum_k A_k sum_l w_kl (z_k/gamma^2 - e_kl/m_kl) = grad_x log p_t(x)

Ladder: kernels (csrc/cpu/molr_mog_score_cpu.cpp, csrc/cuda, ops/triton/molr_mog_score.py) -> ``MoLRMoGScoreFn``
-> ``molr_mog_score`` -> ``moekernels.nn.MoLRMoGScore``.

Kernel contract (every fused backend; see csrc/include/molr_mog_score.h for the per-row math):
    forward(x (B,D), s (B,), gamma (B,), A (K,D,d) or None, mu (K,L,d), log_var (K,L,d), logpi (K,L) normalised,
            return_weights) -> (score (B,D), lse (B,), w (B,K,L) or an empty tensor)
    backward(G, g_lse, g_w or None, x, s, gamma, A or None, mu, log_var, logpi, lse)
            -> (dx, dA or None, dmu, dlog_var, dlogpi)
All tensors contiguous, same dtype and device; s and gamma are not differentiated.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from moekernels import _extension
from moekernels.ops import dispatch

__all__ = ["MoLRMoGScoreOutput", "molr_mog_score", "molr_mog_score_ref", "molr_mog_score_eager",
           "MoLRMoGScoreFn", "SPEC"]

_LOG_2PI = math.log(2.0 * math.pi)


class MoLRMoGScoreOutput(NamedTuple):
    score: torch.Tensor  # (B, D) grad_x log p_t(x)
    weights: torch.Tensor | None  # (B, K, L) posterior weights w_kl, if asked
    lse: torch.Tensor | None  # (B,) log p_t(x), if asked


# ----------------------------------------------------------------------------------------------- references
def molr_mog_score_ref(x, s, gamma, A, mu, log_var, log_pi):
    """Readable reference, line by line from the formula (materialises B x K x L x d).

    s, gamma: Python numbers, 0-dim or (B,) tensors. A: (K, D, d) or None (identity, D == d).
    Returns (score (B, D), w (B, K, L), lse (B,)).
    """
    B, D = x.shape
    K, L, d = mu.shape
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
    gamma = torch.as_tensor(gamma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    g2 = gamma * gamma
    logpi = torch.log_softmax(log_pi.reshape(-1), dim=0).view(K, L)
    if A is None:
        z = x[:, None, :].expand(B, K, d)  # z_k = x
    else:
        z = torch.einsum("kDd,bD->bkd", A, x)  # z_k = A_k^T x
    e = z[:, :, None, :] - s * mu  # (B, K, L, d)
    m = s * s * log_var.exp() + g2  # (B or 1, K, L, d)
    l = (logpi
         - 0.5 * (m.log() + e * e / m).sum(-1)
         + (z * z).sum(-1)[:, :, None] / (2 * g2[:, :, :, 0])
         - (D - d) / 2 * g2[:, :, :, 0].log()
         - (x * x).sum(-1)[:, None, None] / (2 * g2[:, :, :, 0])
         - D / 2 * _LOG_2PI)  # (B, K, L)
    lse = torch.logsumexp(l.reshape(B, K * L), dim=-1)
    w = torch.exp(l - lse[:, None, None])
    c = (w[..., None] * (z[:, :, None, :] / g2 - e / m)).sum(2)  # (B, K, d)
    back = c.sum(1) if A is None else torch.einsum("kDd,bkd->bD", A, c)
    score = -x / g2[:, 0, 0] + back
    return score, w, lse


def molr_mog_score_eager(x, s, gamma, A, mu, log_var, log_pi):
    """The fastest plain-PyTorch formulation (the ``eager`` backend and the benchmarks' baseline), with the
    numerics of the fused kernels: projections by one matmul against A_cat (D, K*d); the softmax over
    l' = l - R without the row constant R; (||z_k||^2 - ||x||^2) formed before the 1/(2 gamma^2) scaling; and, for
    A = None, score = -sum_kl w_kl e_kl / m_kl (no 1/gamma^2 cancellation). Half-precision inputs are computed in
    float32. Returns (score, w, lse) like the ref; differentiable by autograd."""
    out_dtype = x.dtype
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    x, mu, log_var, log_pi = (t.to(acc) for t in (x, mu, log_var, log_pi))
    A = None if A is None else A.to(acc)
    B, D = x.shape
    K, L, d = mu.shape
    s = torch.as_tensor(s, dtype=acc, device=x.device).reshape(-1)
    gamma = torch.as_tensor(gamma, dtype=acc, device=x.device).reshape(-1)
    g2 = gamma * gamma  # (B,) or (1,)
    s4 = s.view(-1, 1, 1, 1)
    logpi = torch.log_softmax(log_pi.reshape(-1), dim=0).view(K, L)
    if A is None:
        z = x.view(B, 1, d)
    else:
        A_cat = A.permute(1, 0, 2).reshape(D, K * d)
        z = (x @ A_cat).view(B, K, d)
    m = (s4 * s4) * log_var.exp() + g2.view(-1, 1, 1, 1)  # (B or 1, K, L, d)
    inv_m = m.reciprocal()
    e = z[:, :, None, :] - s4 * mu  # (B, K, L, d)
    ei = e * inv_m
    l = (logpi - 0.5 * m.log().sum(-1)) - 0.5 * (e * ei).sum(-1)  # (B, K, L) without R
    if A is not None:
        proj = ((z * z).sum(-1) - (x * x).sum(-1, keepdim=True)) / (2 * g2.view(-1, 1))  # (B, K)
        l = l + proj[:, :, None]
    lse_rel = torch.logsumexp(l.reshape(B, K * L), dim=-1)
    w = torch.exp(l - lse_rel[:, None, None])
    lse = lse_rel - 0.5 * (D - d) * g2.log() - 0.5 * D * _LOG_2PI
    if A is None:
        score = -(w[..., None] * ei).sum((1, 2))
    else:
        c = (w.sum(-1) / g2.view(-1, 1))[:, :, None] * z - (w[..., None] * ei).sum(2)  # (B, K, d)
        score = c.reshape(B, K * d) @ A_cat.T - x / g2.view(-1, 1)
    return score.to(out_dtype), w.to(out_dtype), lse.to(out_dtype)


# ----------------------------------------------------------------------------------------------- backends
class _TorchOpsImpl:
    """The compiled kernels (cpu and cuda register under the same torch.ops names)."""

    @staticmethod
    def forward(x, s, gamma, A, mu, log_var, logpi, return_weights):
        return torch.ops.moekernels.molr_mog_score_fwd(x, s, gamma, A, mu, log_var, logpi, return_weights)

    @staticmethod
    def backward(G, g_lse, g_w, x, s, gamma, A, mu, log_var, logpi, lse):
        return torch.ops.moekernels.molr_mog_score_bwd(G, g_lse, g_w, x, s, gamma, A, mu, log_var, logpi, lse)


def _impl(backend: str):
    """One backend's kernels (the contract in the module docstring)."""
    if backend == "triton":
        from moekernels.ops.triton import molr_mog_score as tri

        return tri
    return _TorchOpsImpl


class MoLRMoGScoreFn(torch.autograd.Function):
    """Fused forward/backward on a compiled or Triton backend. Inputs contiguous, same dtype: x (B,D), s (B,),
    gamma (B,), A (K,D,d) or None, mu (K,L,d), log_var (K,L,d), logpi (K,L) normalised. Saves only the inputs and
    lse (B,); the backward recomputes the projections and the weights."""

    @staticmethod
    def forward(ctx, x, s, gamma, A, mu, log_var, logpi, return_weights: bool, backend: str):
        impl = _impl(backend)
        score, lse, w = impl.forward(x, s, gamma, A, mu, log_var, logpi, return_weights)
        ctx.backend = backend
        ctx.return_weights = return_weights
        ctx.has_A = A is not None
        ctx.save_for_backward(x, s, gamma, A, mu, log_var, logpi, lse)
        ctx.set_materialize_grads(False)
        if not return_weights:
            ctx.mark_non_differentiable(w)
        return score, lse, w

    @staticmethod
    def backward(ctx, g_score, g_lse, g_w):
        x, s, gamma, A, mu, log_var, logpi, lse = ctx.saved_tensors
        G = torch.zeros_like(x) if g_score is None else g_score.contiguous()
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse.contiguous()
        g_w = g_w.contiguous() if (ctx.return_weights and g_w is not None) else None
        dx, dA, dmu, dlog_var, dlogpi = _impl(ctx.backend).backward(
            G, g_lse, g_w, x, s, gamma, A, mu, log_var, logpi, lse)
        return dx, None, None, (dA if ctx.has_A else None), dmu, dlog_var, dlogpi, None, None


# ----------------------------------------------------------------------------------------------- checks
_NAMES = ("x", "A", "mu", "log_var", "log_pi")


def _as_rows(name, v, x):
    """s / gamma as a tensor of shape (1,) or (B,) in x's dtype/device (not differentiated)."""
    B = x.shape[0]
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        if not math.isfinite(v) or (name == "gamma" and v <= 0):
            raise ValueError(f"molr_mog_score: {name} must be finite{' and > 0' if name == 'gamma' else ''}, got {v}")
        return torch.full((1,), float(v), dtype=x.dtype, device=x.device)
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"molr_mog_score: {name} must be a number or a tensor, got {type(v).__name__}")
    if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"molr_mog_score: {name} must be a real tensor, got dtype {v.dtype}")
    if v.device != x.device:
        raise ValueError(f"molr_mog_score: {name} is on {v.device} but x is on {x.device}")
    if v.numel() == 1 and v.dim() <= 2:
        return v.detach().reshape(1).to(x.dtype)
    if tuple(v.shape) not in ((B,), (B, 1)):
        raise ValueError(f"molr_mog_score: {name} must be a scalar, (B,) or (B, 1) with B={B}, got shape {tuple(v.shape)}")
    return v.detach().reshape(B).to(x.dtype)


def _check(x, A, mu, log_var, log_pi):
    dispatch.check_float_tensors("molr_mog_score", dict(zip(_NAMES, (x, A, mu, log_var, log_pi))))
    if x.dim() != 2:
        raise ValueError(f"molr_mog_score: x must be (B, D), got shape {tuple(x.shape)}")
    if mu.dim() != 3 or min(mu.shape) < 1:
        raise ValueError(f"molr_mog_score: mu must be (K, L, d) with K, L, d >= 1, got shape {tuple(mu.shape)}")
    K, L, d = mu.shape
    D = x.shape[1]
    if A is None:
        if D != d:
            raise ValueError(f"molr_mog_score: A=None (identity) needs D == d, got x with D={D} and mu with d={d}")
    elif tuple(A.shape) != (K, D, d):
        raise ValueError(f"molr_mog_score: A must be (K, D, d)=({K}, {D}, {d}), got shape {tuple(A.shape)}")
    if tuple(log_var.shape) != (K, L, d):
        raise ValueError(f"molr_mog_score: log_var must be (K, L, d)=({K}, {L}, {d}), got shape {tuple(log_var.shape)}")
    if tuple(log_pi.shape) != (K, L):
        raise ValueError(f"molr_mog_score: log_pi must be (K, L)=({K}, {L}), got shape {tuple(log_pi.shape)}")


SPEC = dispatch.OpSpec(
    name="molr_mog_score",
    dtypes={"eager": dispatch.FLOAT_DTYPES, "cpu": (torch.float32, torch.float64),
            "cuda": dispatch.FLOAT_DTYPES, "triton": (torch.float16, torch.bfloat16, torch.float32)},
    cuda_order=("cuda", "triton"),
    kernel="molr_mog_score_fwd",
    triton_module="molr_mog_score",
)


# ----------------------------------------------------------------------------------------------- public op
def molr_mog_score(x, s, gamma, A, mu, log_var, log_pi, *, return_weights: bool = False, return_lse: bool = False,
                   backend: str = "auto"):
    """Score of the noised MoLR-MoG distribution (and its posterior weights and log-density), fused.

    Args:
        x: (B, D) noised data. s, gamma: signal scale and noise std at each row's time: Python numbers, 0-dim,
            (B,) or (B, 1) tensors (not differentiated; gamma > 0). A: (K, D, d) expert bases with orthonormal
            columns, or None for the identity (D == d, the latent case). mu, log_var: (K, L, d) latent means and
            diagonal log-variances. log_pi: (K, L) unnormalised log mixture weights (normalised over all K*L).
        return_weights: also return w (B, K, L). return_lse: also return log p_t(x) (B,).
        backend: "auto" | "eager" | "cpu" | "triton" | "cuda".

    Returns:
        score (B, D) if neither flag is set, else MoLRMoGScoreOutput(score, weights or None, lse or None).
        Differentiable in x, A, mu, log_var and log_pi.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"molr_mog_score: x must be a torch.Tensor, got {type(x).__name__}")
    _check(x, A, mu, log_var, log_pi)
    s_rows, g_rows = _as_rows("s", s, x), _as_rows("gamma", gamma, x)
    tensors = {n: t for n, t in zip(_NAMES, (x, A, mu, log_var, log_pi)) if t is not None}
    which = dispatch.resolve(SPEC, backend, tensors)
    if which == "eager":
        score, w, lse = molr_mog_score_eager(x, s_rows, g_rows, A, mu, log_var, log_pi)
    else:
        B = x.shape[0]
        K, L, _ = mu.shape
        logpi = torch.log_softmax(log_pi.reshape(-1), dim=0).view(K, L)
        score, lse, w = MoLRMoGScoreFn.apply(
            x.contiguous(), s_rows.expand(B).contiguous(), g_rows.expand(B).contiguous(),
            None if A is None else A.contiguous(), mu.contiguous(), log_var.contiguous(), logpi.contiguous(),
            bool(return_weights), which)
    if not (return_weights or return_lse):
        return score
    return MoLRMoGScoreOutput(score, w if return_weights else None, lse if return_lse else None)


if _extension.available():  # fake (meta) kernels so torch.compile can trace through the compiled ops
    try:
        @torch.library.register_fake("moekernels::molr_mog_score_fwd")
        def _fwd_fake(x, s, gamma, A, mu, log_var, logpi, return_weights):
            B = x.shape[0]
            K, L, _ = mu.shape
            w = x.new_empty(B, K, L) if return_weights else x.new_empty(0)
            return torch.empty_like(x), x.new_empty(B), w

        @torch.library.register_fake("moekernels::molr_mog_score_bwd")
        def _bwd_fake(G, g_lse, g_w, x, s, gamma, A, mu, log_var, logpi, lse):
            dA = None if A is None else torch.empty_like(A)
            return torch.empty_like(x), dA, torch.empty_like(mu), torch.empty_like(log_var), torch.empty_like(logpi)
    except RuntimeError:  # an extension built before these schemas existed: the backends report it
        pass
