"""``MixturePrior``: the Gaussian-mixture prior of mixDDPM / mixSGM (arXiv 2410.19149), on ``MoGDispatcher``.

    prior = MixturePrior(n_components=8, dim=2).fit(x, generator=torch.Generator().manual_seed(0))
    k = prior.dispatch(x0)                 # (B,) component of each training point (argmax, or a posterior draw)
    c = prior.centres_of(k)                # (B, D) the centre c_k each row's forward process ends at
    xT, k = prior.sample(n, generator=g, return_components=True)    # k ~ weights, x_T ~ N(c_k, std^2 I)
    prior.log_prob(xT)                     # log sum_k p_k N(x; c_k, std^2 I)
    prior.effort_reduction()               # sum_k p_k ||c_k||^2 (analytic reverse-effort reduction vs N(0, I))

The centres c_k and weights p_k are the means and weights of a K-component diagonal (or spherical) Gaussian
mixture fitted by EM (``MoGDispatcher.fit``, the fused ``mog_posterior`` op); the dispatcher assigns a training
point to the argmax component (``hard=True``, default) or to a component drawn from its posterior. The prior
itself is the isotropic mixture sum_k p_k N(c_k, std^2 I) (std = 1 as in the paper's formulation), whatever the
fitted cluster variances are: those only shape the dispatch. ``MixturePrior.standard(dim)`` is the N(0, I)
prior of DDPM / SGM as the K = 1, c = 0 special case, so the baselines run through the same code.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from moekernels.nn.dispatcher import MoGDispatcher
from moekernels.ops.mog_posterior import mog_posterior

__all__ = ["MixturePrior"]


class MixturePrior(nn.Module):
    """sum_k p_k N(c_k, std^2 I) with a dispatcher x -> k.

    Args:
        n_components: K >= 1. dim: D >= 1.
        covariance_type: of the fitted mixture used for dispatch, "diag" or "spherical".
        hard: dispatch to the argmax component (True) or draw it from the posterior (False).
        std: standard deviation of each prior component (> 0; 1 in mixDDPM / mixSGM).
        backend: the ``mog_posterior`` backend.
    """

    def __init__(self, n_components: int, dim: int, covariance_type: str = "diag", hard: bool = True,
                 std: float = 1.0, backend: str = "auto"):
        super().__init__()
        if not (isinstance(std, (int, float)) and not isinstance(std, bool) and std > 0 and math.isfinite(std)):
            raise ValueError(f"MixturePrior: std must be a finite number > 0, got {std!r}")
        self.dispatcher = MoGDispatcher(n_components, dim, covariance_type=covariance_type, hard=hard, backend=backend)
        self.std = float(std)
        self.fitted = False

    @classmethod
    def standard(cls, dim: int, std: float = 1.0) -> "MixturePrior":
        """The N(0, std^2 I) prior (K = 1, c = 0): DDPM / SGM through the same code path."""
        p = cls(1, dim, covariance_type="spherical", std=std)
        with torch.no_grad():
            p.dispatcher.means.zero_()
            p.dispatcher.log_var.zero_()
            p.dispatcher.log_pi.zero_()
        p.fitted = True
        return p

    @property
    def n_components(self) -> int:
        return self.dispatcher.n_components

    @property
    def dim(self) -> int:
        return self.dispatcher.dim

    @property
    def hard(self) -> bool:
        return self.dispatcher.hard

    @property
    def centres(self) -> torch.Tensor:
        """c (K, D), detached."""
        return self.dispatcher.means.detach()

    @property
    def weights(self) -> torch.Tensor:
        """p (K,), detached."""
        return self.dispatcher.weights

    def extra_repr(self) -> str:
        return f"std={self.std}, fitted={self.fitted}"

    # --------------------------------------------------------------------------------------------- fitting
    def fit(self, x, **kwargs) -> "MixturePrior":
        """EM fit of the dispatcher on the training data x (N, D); kwargs go to ``MoGDispatcher.fit``
        (n_iter, tol, init, reg_covar, generator, verbose, batch_size). Returns self."""
        self.dispatcher.fit(x, **kwargs)
        self.fitted = True
        return self

    def _need_fit(self, where):
        if not self.fitted:
            raise RuntimeError(f"MixturePrior.{where}: call fit(x) first (or use MixturePrior.standard(dim))")

    # --------------------------------------------------------------------------------------------- use
    def dispatch(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Component of each row of x (B, D): (B,) int64 (argmax, or a posterior draw when not ``hard``)."""
        self._need_fit("dispatch")
        if self.n_components == 1:
            self.dispatcher._check_x(x, "forward")
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.dispatcher(x, generator=generator)

    def centres_of(self, k: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """c_k per row: (B, D) for k (B,) int64."""
        k = torch.as_tensor(k)
        if k.dtype != torch.long or k.dim() != 1:
            raise ValueError(f"MixturePrior.centres_of: k must be a (B,) int64 tensor, got {k.dtype} {tuple(k.shape)}")
        if k.numel() and (int(k.min()) < 0 or int(k.max()) >= self.n_components):
            raise ValueError(f"MixturePrior.centres_of: k must lie in [0, {self.n_components}), "
                             f"got values in [{int(k.min())}, {int(k.max())}]")
        c = self.centres.to(k.device)[k]
        return c if dtype is None else c.to(dtype)

    def sample_components(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n components drawn from the weights: (n,) int64."""
        self._need_fit("sample_components")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"MixturePrior.sample_components: n must be an int >= 1, got {n!r}")
        w = self.weights.to(torch.float64).cpu()
        return torch.multinomial(w, n, replacement=True, generator=generator).to(self.centres.device)

    def sample(self, n: int, generator: torch.Generator | None = None, return_components: bool = False,
               dtype: torch.dtype = torch.float32):
        """n prior draws x_T = c_k + std * eps with k ~ p: (n, D), and k (n,) with ``return_components``."""
        k = self.sample_components(n, generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=dtype).to(self.centres.device)
        x = self.centres_of(k, dtype) + self.std * eps
        return (x, k) if return_components else x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log sum_k p_k N(x; c_k, std^2 I) per row of x (B, D): (B,). Through ``mog_posterior``."""
        self._need_fit("log_prob")
        x = self.dispatcher._check_x(x, "log_prob")
        dtype = torch.promote_types(x.dtype, self.centres.dtype)
        K = self.n_components
        log_var = torch.full((K,), 2 * math.log(self.std), dtype=dtype, device=x.device)
        return mog_posterior(x.to(dtype), self.centres.to(dtype), log_var, self.dispatcher.log_pi.detach().to(dtype),
                             backend=self.dispatcher.backend).lse

    def effort_reduction(self) -> float:
        """sum_k p_k ||c_k||^2: how much E||x_T - x_0||^2 drops from the N(0, I) prior to this one when the
        centres are the cluster means of the data (E[x_0 | k] = c_k) and p_k the cluster fractions."""
        self._need_fit("effort_reduction")
        c = self.centres.to(torch.float64)
        return float((self.weights.to(torch.float64) * c.square().sum(1)).sum())
