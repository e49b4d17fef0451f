"""Gaussian-mixture posterior (DESIGN.md section 3.2): responsibilities, log-likelihood and argmax per row,
without materialising B x K x D.

    l_k   = logpi_k - 1/2 sum_j [log(2 pi v_kj) + (x_j - c_kj)^2 / v_kj],  logpi = log_softmax(log_pi)
    lse   = logsumexp_k l_k ;  log_resp_k = l_k - lse ;  assign = argmax_k l_k

Ladder: kernels (csrc/cpu, csrc/cuda, ops/triton/mog_posterior.py) -> ``MoGPosteriorFn`` -> ``mog_posterior``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from moekernels import _extension
from moekernels.ops import dispatch

__all__ = ["MoGPosterior", "mog_posterior", "mog_posterior_ref", "mog_posterior_eager", "MoGPosteriorFn", "SPEC"]

_LOG_2PI = math.log(2.0 * math.pi)


class MoGPosterior(NamedTuple):
    log_resp: torch.Tensor  # (B, K) log posterior responsibilities
    lse: torch.Tensor  # (B,) log p(x)
    assign: torch.Tensor  # (B,) int64 argmax_k
    sample: torch.Tensor | None  # (B,) int64 component drawn from the posterior (Gumbel-max), if asked


# ----------------------------------------------------------------------------------------------- references
def mog_posterior_ref(x, means, log_var, log_pi):
    """Readable reference: the B x K x D broadcast, line by line from the formula. Returns (log_resp, lse, assign)."""
    logpi = torch.log_softmax(log_pi, dim=-1)
    if log_var.dim() == 1:  # isotropic: one variance per component
        log_var = log_var[:, None].expand_as(means)
    var = log_var.exp()
    diff = x[:, None, :] - means[None, :, :]  # (B, K, D)
    l = logpi - 0.5 * (_LOG_2PI + log_var + diff.square() / var).sum(-1)
    lse = torch.logsumexp(l, dim=-1)
    return l - lse[:, None], lse, l.argmax(dim=-1)


def mog_posterior_eager(x, means, log_var, log_pi):
    """The fastest plain-PyTorch formulation (the ``eager`` backend and the benchmarks' baseline): squared
    distances by matrix products, centred on the mean of the means so data far from the origin stays accurate."""
    logpi = torch.log_softmax(log_pi, dim=-1)
    if log_var.dim() == 1:
        log_var = log_var[:, None].expand_as(means)
    centre = means.detach().mean(0)
    xc, mc = x - centre, means - centre
    inv_var = torch.exp(-log_var)
    quad = (xc * xc) @ inv_var.T - 2.0 * (xc @ (mc * inv_var).T) + (mc * mc * inv_var).sum(-1)
    l = (logpi - 0.5 * (_LOG_2PI * means.shape[-1] + log_var.sum(-1))) - 0.5 * quad
    lse = torch.logsumexp(l, dim=-1)
    return l - lse[:, None], lse, l.argmax(dim=-1)


# ----------------------------------------------------------------------------------------------- backends
class _TorchOpsImpl:
    """The compiled kernels (cpu and cuda register under the same torch.ops names)."""

    @staticmethod
    def forward(x, means, log_var, logpi):
        return torch.ops.moekernels.mog_posterior_fwd(x, means, log_var, logpi)

    @staticmethod
    def backward(g_log_resp, g_lse, x, means, log_var, log_resp):
        return torch.ops.moekernels.mog_posterior_bwd(g_log_resp, g_lse, x, means, log_var, log_resp)


class MoGPosteriorFn(torch.autograd.Function):
    """Fused forward/backward on a compiled or Triton backend. Inputs: x (B,D), means (K,D), log_var (K,D),
    logpi (K,) normalised. Backward uses the saved log_resp (B x K), never B x K x D."""

    @staticmethod
    def forward(ctx, x, means, log_var, logpi, backend: str):
        impl = _impl(backend)
        log_resp, lse, assign = impl.forward(x, means, log_var, logpi)
        ctx.backend = backend
        ctx.save_for_backward(x, means, log_var, log_resp)
        ctx.mark_non_differentiable(assign)
        return log_resp, lse, assign

    @staticmethod
    def backward(ctx, g_log_resp, g_lse, _g_assign):
        x, means, log_var, log_resp = ctx.saved_tensors
        impl = _impl(ctx.backend)
        dx, dmeans, dlog_var, dlogpi = impl.backward(
            g_log_resp.contiguous(), g_lse.contiguous(), x, means, log_var, log_resp)
        return dx, dmeans, dlog_var, dlogpi, None


def _impl(backend: str):
    """One backend's kernels: forward(x, means, log_var (K,D), logpi) -> (log_resp, lse, assign) and
    backward(g_log_resp, g_lse, x, means, log_var, log_resp) -> (dx, dmeans, dlog_var, dlogpi).
    All tensors contiguous, logpi already normalised."""
    if backend == "triton":
        from moekernels.ops.triton import mog_posterior as tri

        return tri
    return _TorchOpsImpl


# ----------------------------------------------------------------------------------------------- public op
def _check(x, means, log_var, log_pi):
    dispatch.check_float_tensors("mog_posterior", {"x": x, "means": means, "log_var": log_var, "log_pi": log_pi})
    if x.dim() != 2:
        raise ValueError(f"mog_posterior: x must be (B, D), got shape {tuple(x.shape)}")
    if means.dim() != 2 or means.shape[1] != x.shape[1] or means.shape[0] < 1:
        raise ValueError(f"mog_posterior: means must be (K, D) with D={x.shape[1]} and K >= 1, got shape {tuple(means.shape)}")
    K = means.shape[0]
    if tuple(log_var.shape) not in ((K, x.shape[1]), (K,)):
        raise ValueError(f"mog_posterior: log_var must be (K, D)=({K}, {x.shape[1]}) or (K,)=({K},), got shape {tuple(log_var.shape)}")
    if tuple(log_pi.shape) != (K,):
        raise ValueError(f"mog_posterior: log_pi must be (K,)=({K},), got shape {tuple(log_pi.shape)}")


SPEC = dispatch.OpSpec(
    name="mog_posterior",
    dtypes={"eager": dispatch.FLOAT_DTYPES, "cpu": (torch.float32, torch.float64),
            "cuda": dispatch.FLOAT_DTYPES, "triton": (torch.float16, torch.bfloat16, torch.float32)},
    cuda_order=("cuda", "triton"),
    kernel="mog_posterior_fwd",
    triton_module="mog_posterior",
)


def mog_posterior(x, means, log_var, log_pi, *, sample: bool = False, generator: torch.Generator | None = None,
                  backend: str = "auto") -> MoGPosterior:
    """Posterior of a K-component Gaussian mixture with diagonal (K, D) or isotropic (K,) variances.

    Args:
        x: (B, D) data. means: (K, D). log_var: (K, D) or (K,) log-variances. log_pi: (K,) unnormalised log
        weights (normalised by log_softmax inside). sample: also draw one component per row from the posterior
        (Gumbel-max with ``generator``). backend: "auto" | "eager" | "cpu" | "triton" | "cuda".

    Returns:
        MoGPosterior(log_resp (B, K), lse (B,) = log p(x), assign (B,) int64, sample (B,) int64 or None).
        Differentiable in x, means, log_var and log_pi.
    """
    _check(x, means, log_var, log_pi)
    tensors = {"x": x, "means": means, "log_var": log_var, "log_pi": log_pi}
    which = dispatch.resolve(SPEC, backend, tensors)
    if which == "eager":
        log_resp, lse, assign = mog_posterior_eager(x, means, log_var, log_pi)
    else:
        logpi = torch.log_softmax(log_pi, dim=-1)
        lv = log_var[:, None].expand_as(means) if log_var.dim() == 1 else log_var
        log_resp, lse, assign = MoGPosteriorFn.apply(
            x.contiguous(), means.contiguous(), lv.contiguous(), logpi.contiguous(), which)
    drawn = None
    if sample:
        u = torch.rand(log_resp.shape, generator=generator, device=x.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float32).tiny)))
        drawn = (log_resp.detach().float() + gumbel).argmax(dim=-1)
    return MoGPosterior(log_resp, lse, assign, drawn)


if _extension.available():  # fake (meta) kernels so torch.compile can trace through the compiled ops

    @torch.library.register_fake("moekernels::mog_posterior_fwd")
    def _fwd_fake(x, means, log_var, logpi):
        B, K = x.shape[0], means.shape[0]
        return x.new_empty(B, K), x.new_empty(B), x.new_empty(B, dtype=torch.long)

    @torch.library.register_fake("moekernels::mog_posterior_bwd")
    def _bwd_fake(g_log_resp, g_lse, x, means, log_var, log_resp):
        return torch.empty_like(x), torch.empty_like(means), torch.empty_like(log_var), means.new_empty(means.shape[0])
