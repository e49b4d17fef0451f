"""Synthetic MoLR-MoG data (arXiv 2601.01475): a union of K random d-dimensional subspaces of R^D, each with an
L-component diagonal Gaussian-mixture latent, with known parameters (A, mu, var, pi) -- the exact-score oracle.

    x_0 = A_k z,  z ~ N(mu_kl, diag(var_kl))  with probability pi_kl        (A_k: (D, d), orthonormal columns)
    x_t = s(t) x_0 + gamma(t) eps                                            (any ``Schedule``, default VP)

* ``SubspaceMoG.score(x, t)``: the true score grad log p_t(x) = ``molr_mog_score`` with the true parameters
  (DESIGN.md section 3.1).
* ``SubspaceMoG.log_prob(x, t)``: log p_t(x) computed independently of that op, as a dense Gaussian mixture in R^D
  (covariance s^2 A_k diag(var_kl) A_k^T + gamma^2 I, Cholesky): O(K L D^3) -- for tests and small D.

    gen = SubspaceMoG(dim=256, n_experts=4, n_components=3, latent_dim=4, seed=0)
    x0, k = gen.sample(2000, seed=1, return_labels=True)
    s_true = gen.score(x_t, t)          # (B, D)
"""
from __future__ import annotations

import math

import torch

from moekernels.diffusion.schedules import Schedule, VPSchedule
from moekernels.ops.molr_mog_score import molr_mog_score

__all__ = ["SubspaceMoG", "random_orthonormal_bases"]


def random_orthonormal_bases(K: int, D: int, d: int, generator: torch.Generator | None = None,
                             dtype=torch.float64) -> torch.Tensor:
    """(K, D, d): K Haar-random d-dimensional orthonormal frames of R^D (QR of Gaussians, sign-fixed)."""
    W = torch.randn(K, D, d, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(W, mode="reduced")
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    sign[sign == 0] = 1.0
    return (Q * sign[..., None, :]).to(dtype)


class SubspaceMoG:
    """MoLR-MoG generator with known parameters.

    Args:
        dim: D. n_experts: K subspaces. n_components: L latent modes per subspace. latent_dim: d (<= D).
        mean_scale: latent means mu_kl ~ N(0, mean_scale^2 I_d).
        var_range: latent variances var_kl,i ~ U(var_range) (per coordinate, diagonal).
        seed: seeds the parameters (bases, means, variances; mixture weights are uniform unless
            ``random_weights``). schedule: the noising schedule for ``score``/``log_prob`` at a time t
            (default ``VPSchedule()``). dtype: of the parameters and of the samples.

    Attributes: ``A`` (K, D, d), ``mu`` (K, L, d), ``var`` (K, L, d), ``pi`` (K, L) (sums to 1),
    ``log_var``/``log_pi`` (the op's parametrisation) and ``intrinsic_size`` = sum_k n_k d_k = K * L * d.
    """

    def __init__(self, dim: int, n_experts: int, n_components: int, latent_dim: int, *, mean_scale: float = 1.0,
                 var_range: tuple = (0.05, 0.2), random_weights: bool = False, seed: int = 0,
                 schedule: Schedule | None = None, dtype=torch.float64):
        for name, v in (("dim", dim), ("n_experts", n_experts), ("n_components", n_components),
                        ("latent_dim", latent_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SubspaceMoG: {name} must be an int >= 1, got {v!r}")
        if latent_dim > dim:
            raise ValueError(f"SubspaceMoG: latent_dim={latent_dim} must be <= dim={dim}")
        if not (isinstance(mean_scale, (int, float)) and mean_scale >= 0 and math.isfinite(mean_scale)):
            raise ValueError(f"SubspaceMoG: mean_scale must be finite and >= 0, got {mean_scale!r}")
        if not (isinstance(var_range, (tuple, list)) and len(var_range) == 2
                and all(isinstance(v, (int, float)) for v in var_range)):
            raise ValueError(f"SubspaceMoG: var_range must be (lo, hi) with 0 < lo <= hi, got {var_range!r}")
        lo, hi = var_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"SubspaceMoG: var_range must be (lo, hi) with 0 < lo <= hi, got {var_range!r}")
        self.dim, self.n_experts, self.n_components, self.latent_dim = dim, n_experts, n_components, latent_dim
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.dtype = dtype
        g = torch.Generator().manual_seed(int(seed))
        K, L, D, d = n_experts, n_components, dim, latent_dim
        self.A = random_orthonormal_bases(K, D, d, g, dtype)
        self.mu = (mean_scale * torch.randn(K, L, d, generator=g, dtype=torch.float64)).to(dtype)
        self.var = (lo + (hi - lo) * torch.rand(K, L, d, generator=g, dtype=torch.float64)).to(dtype)
        w = (0.5 + torch.rand(K, L, generator=g, dtype=torch.float64)) if random_weights \
            else torch.ones(K, L, dtype=torch.float64)
        self.pi = (w / w.sum()).to(dtype)

    # ---------------------------------------------------------------------------------------- parameters
    @property
    def log_var(self) -> torch.Tensor:
        return self.var.log()

    @property
    def log_pi(self) -> torch.Tensor:
        return self.pi.log()

    @property
    def intrinsic_size(self) -> int:
        """sum_k n_k d_k (= K L d): the quantity the paper's estimation error depends on instead of D."""
        return self.n_experts * self.n_components * self.latent_dim

    def params(self) -> dict:
        return {"A": self.A, "mu": self.mu, "log_var": self.log_var, "log_pi": self.log_pi}

    # ---------------------------------------------------------------------------------------- sampling
    def sample(self, n: int, seed: int | None = None, generator: torch.Generator | None = None,
               return_labels: bool = False):
        """n clean draws x_0 (n, D); with ``return_labels`` also the subspace index k (n,) int64."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"SubspaceMoG.sample: n must be an int >= 1, got {n!r}")
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        _K, L, d = self.mu.shape
        idx = torch.multinomial(self.pi.reshape(-1).double(), n, replacement=True, generator=generator)
        k, l = idx // L, idx % L
        eps = torch.randn(n, d, generator=generator, dtype=torch.float64)
        z = self.mu.double()[k, l] + eps * self.var.double()[k, l].sqrt()
        x0 = torch.einsum("nDd,nd->nD", self.A.double()[k], z).to(self.dtype)
        return (x0, k) if return_labels else x0

    # ---------------------------------------------------------------------------------------- score / density
    def _sg(self, x, t=None, s=None, gamma=None):
        if t is not None:
            if s is not None or gamma is not None:
                raise ValueError("SubspaceMoG: give either t or (s, gamma), not both")
            if torch.is_tensor(t):
                t = t.to(torch.float64).reshape(-1)
            s, gamma = self.schedule(t)
        if s is None or gamma is None:
            raise ValueError("SubspaceMoG: give t, or both s and gamma")
        return s, gamma

    def score(self, x: torch.Tensor, t=None, *, s=None, gamma=None, backend: str = "auto") -> torch.Tensor:
        """True score grad_x log p_t(x) (B, D) via ``molr_mog_score`` with the true parameters; time as t (number
        or (B,)) or directly as (s, gamma)."""
        s, gamma = self._sg(x, t, s, gamma)
        p = {k: v.to(x.dtype) for k, v in self.params().items()}
        return molr_mog_score(x, s, gamma, p["A"], p["mu"], p["log_var"], p["log_pi"], backend=backend)

    def log_prob(self, x: torch.Tensor, t=None, *, s=None, gamma=None) -> torch.Tensor:
        """log p_t(x) (B,), dense and independent of the fused op (see the module docstring). Needs gamma > 0."""
        s, gamma = self._sg(x, t, s, gamma)
        B, D = x.shape
        xd = x.double()
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
        g = torch.as_tensor(gamma, dtype=torch.float64).reshape(-1)
        if bool((g <= 0).any()):
            raise ValueError("SubspaceMoG.log_prob: gamma must be > 0")
        for name, v in (("s", s), ("gamma", g)):
            if v.numel() not in (1, B):
                raise ValueError(f"SubspaceMoG.log_prob: {name} must be a number or have one value per row of x "
                                 f"({B}), got {v.numel()} values")
        if s.numel() == 1 and g.numel() == 1:
            s_rows, g_rows = s.expand(B), g.expand(B)
        else:
            s_rows, g_rows = s.expand(B) if s.numel() == 1 else s, g.expand(B) if g.numel() == 1 else g
        A, mu, var, logpi = self.A.double(), self.mu.double(), self.var.double(), self.pi.double().log()
        K, L, _d = mu.shape
        eye = torch.eye(D, dtype=torch.float64)
        out = torch.empty(B, K * L, dtype=torch.float64)
        for b in torch.unique(torch.stack((s_rows, g_rows), 1), dim=0):  # group rows by their time
            rows = ((s_rows == b[0]) & (g_rows == b[1])).nonzero().reshape(-1)
            sb, gb = float(b[0]), float(b[1])
            for k in range(K):
                for l in range(L):
                    mean = sb * A[k] @ mu[k, l]
                    cov = (sb * sb) * (A[k] * var[k, l]) @ A[k].T + (gb * gb) * eye
                    chol = torch.linalg.cholesky(cov)
                    diff = (xd[rows] - mean).T  # (D, n)
                    sol = torch.linalg.solve_triangular(chol, diff, upper=False)
                    out[rows, k * L + l] = (logpi[k, l] - 0.5 * (sol * sol).sum(0)
                                            - torch.log(torch.diagonal(chol)).sum() - 0.5 * D * math.log(2 * math.pi))
        return torch.logsumexp(out, dim=1).to(x.dtype)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t = s(t) x_0 + gamma(t) eps for per-row times t (B,)."""
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return self.schedule.add_noise(x0, eps, t)

    def __repr__(self):
        return (f"SubspaceMoG(dim={self.dim}, n_experts={self.n_experts}, n_components={self.n_components}, "
                f"latent_dim={self.latent_dim}, schedule={self.schedule})")
