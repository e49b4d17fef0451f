"""``MoLRMoGScore``: the exact score network of a mixture of low-rank mixtures of Gaussians (arXiv 2601.01475),
on the fused ``molr_mog_score`` op.

The model: x_0 = A_k z with z ~ N(mu_kl, diag(exp(log_var_kl))) with probability softmax(log_pi)_kl; noised by a
schedule, x_t = s(t) x_0 + gamma(t) eps. ``forward(x, t)`` is the exact score grad_x log p_t(x); time enters only
through (s(t), gamma(t)).
"""
from __future__ import annotations

import torch
from torch import nn

from moekernels.diffusion.schedules import Schedule, VPSchedule
from moekernels.ops.molr_mog_score import molr_mog_score

__all__ = ["MoLRMoGScore"]


def _orthonormal_columns(W: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of each (D, d) slice, columns signed so diag(R) > 0: a smooth map onto matrices with
    orthonormal columns (differentiable; the identity on matrices that already have them)."""
    Q, R = torch.linalg.qr(W, mode="reduced")
    sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) >= 0, 1.0, -1.0).to(Q.dtype)
    return Q * sign[..., None, :]


class MoLRMoGScore(nn.Module):
    """Score network of a MoLR-MoG model with K experts (d-dim subspaces of R^D) and L latent components each.

    Args:
        dim: D, data dimension. n_experts: K. n_components: L (per expert). latent_dim: d (<= D).
        schedule: a ``moekernels.diffusion.schedules.Schedule`` (default ``VPSchedule()``).
        basis: "learned" (A_k = QR(W_k), orthonormal columns, the kernel assumes them) or "identity" (A = I,
            D == d: the latent-space model used inside MoE-latent VAEs; no projection).
        backend: passed to ``molr_mog_score`` ("auto" | "eager" | "cpu" | "triton" | "cuda").

    Parameters: ``basis_weight`` (K, D, d) (learned basis only), ``mu`` (K, L, d), ``log_var`` (K, L, d),
    ``log_pi`` (K, L).
    """

    def __init__(self, dim: int, n_experts: int, n_components: int, latent_dim: int,
                 schedule: Schedule | None = None, *, basis: str = "learned", backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if min(dim, n_experts, n_components, latent_dim) < 1:
            raise ValueError("MoLRMoGScore: dim, n_experts, n_components and latent_dim must be >= 1")
        if latent_dim > dim:
            raise ValueError(f"MoLRMoGScore: latent_dim={latent_dim} must be <= dim={dim}")
        if basis not in ("learned", "identity"):
            raise ValueError(f"MoLRMoGScore: basis must be 'learned' or 'identity', got {basis!r}")
        if basis == "identity" and latent_dim != dim:
            raise ValueError(f"MoLRMoGScore: basis='identity' needs latent_dim == dim, got {latent_dim} != {dim}")
        self.dim, self.n_experts, self.n_components, self.latent_dim = dim, n_experts, n_components, latent_dim
        self.basis_kind = basis
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.backend = backend
        fk = {"device": device, "dtype": dtype}
        K, L, D, d = n_experts, n_components, dim, latent_dim
        if basis == "learned":
            self.basis_weight = nn.Parameter(torch.empty(K, D, d, **fk))
        else:
            self.register_parameter("basis_weight", None)
        self.mu = nn.Parameter(torch.empty(K, L, d, **fk))
        self.log_var = nn.Parameter(torch.empty(K, L, d, **fk))
        self.log_pi = nn.Parameter(torch.empty(K, L, **fk))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Random orthonormal bases, standard-normal latent means, unit variances, uniform weights."""
        if self.basis_weight is not None:
            w = torch.randn(self.basis_weight.shape, generator=generator, dtype=torch.float64)
            self.basis_weight.copy_(_orthonormal_columns(w))
        self.mu.copy_(torch.randn(self.mu.shape, generator=generator, dtype=torch.float64))
        self.log_var.zero_()
        self.log_pi.zero_()

    # ------------------------------------------------------------------------------------------- parts
    def basis(self) -> torch.Tensor | None:
        """A (K, D, d) with orthonormal columns (differentiable in ``basis_weight``), or None for the identity."""
        return None if self.basis_weight is None else _orthonormal_columns(self.basis_weight)

    def _times(self, x: torch.Tensor, t):
        if torch.is_tensor(t):
            t = t.to(x.device)
            if t.dim() > 1:
                t = t.reshape(-1)
        return self.schedule(t)

    def _op(self, x, t, *, weights=False, lse=False):
        s, g = self._times(x, t)
        return molr_mog_score(x, s, g, self.basis(), self.mu, self.log_var, self.log_pi,
                              return_weights=weights, return_lse=lse, backend=self.backend)

    # ------------------------------------------------------------------------------------------- API
    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """Score grad_x log p_t(x), (B, D). t: a number, or a (B,) / (B, 1) tensor of times."""
        return self._op(x, t)

    def predict_eps(self, x: torch.Tensor, t) -> torch.Tensor:
        """The epsilon prediction -gamma(t) * score (DESIGN.md 5b)."""
        score = self._op(x, t)
        _, g = self._times(x, t)
        g = g.reshape(-1, 1).to(score.dtype) if torch.is_tensor(g) else g
        return -g * score

    def log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """log p_t(x), (B,)."""
        return self._op(x, t, lse=True).lse

    def posterior(self, x: torch.Tensor, t) -> torch.Tensor:
        """Posterior weights p(k, l | x_t), (B, K, L)."""
        return self._op(x, t, weights=True).weights

    @torch.no_grad()
    def sample_x0(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of the clean data x_0 from the model (for tests and demos)."""
        K, L, d = self.mu.shape
        probs = torch.softmax(self.log_pi.detach().reshape(-1).double(), 0)
        idx = torch.multinomial(probs, n, replacement=True, generator=generator)
        k, l = idx // L, idx % L
        eps = torch.randn(n, d, generator=generator, dtype=torch.float64)
        z = self.mu.detach().double()[k, l] + eps * (0.5 * self.log_var.detach().double()[k, l]).exp()
        A = self.basis()
        x0 = z if A is None else torch.einsum("nDd,nd->nD", A.detach().double()[k], z)
        return x0.to(self.mu.dtype)

    def num_parameters(self) -> int:
        """Analytic parameter count: K*D*d (learned basis) + 2*K*L*d + K*L."""
        K, L, D, d = self.n_experts, self.n_components, self.dim, self.latent_dim
        return (K * D * d if self.basis_kind == "learned" else 0) + 2 * K * L * d + K * L

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_experts={self.n_experts}, n_components={self.n_components}, "
                f"latent_dim={self.latent_dim}, basis={self.basis_kind!r}, schedule={self.schedule}, "
                f"backend={self.backend!r}")
