"""``MoGDispatcher``: a Gaussian-mixture dispatcher (mixDDPM / mixSGM, arXiv 2410.19149) built on the fused
``mog_posterior`` op (DESIGN.md section 3.2).

    d = MoGDispatcher(n_components=8, dim=2).fit(x, generator=torch.Generator().manual_seed(0))
    k = d(x)                      # (B,) int64: argmax component (hard=True) or a posterior draw (hard=False)
    r = d.responsibilities(x)     # (B, K)
    lp = d.log_prob(x)            # (B,) log p(x), differentiable in the parameters
    s = d.score(x)                # mean log-likelihood (0-dim tensor)

Every posterior evaluation (forward, responsibilities, log_prob, score, and the E-step of ``fit``) goes through
:func:`moekernels.ops.mog_posterior.mog_posterior`; this module never re-implements the E-step math.

``fit`` is EM as in ``sklearn.mixture.GaussianMixture`` (diag / spherical): the E-step is the fused op, the
M-step accumulates the sufficient statistics N_k, sum_i r_ik x_i, sum_i r_ik x_i^2 in float64 on data centred
at its mean (so clusters far from the origin keep their precision), optionally in row chunks (``batch_size``)
so that millions of points fit in memory. The log-likelihood is translation invariant, so the E-step also runs
on the centred data and centred means.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from moekernels.ops import dispatch
from moekernels.ops.mog_posterior import mog_posterior

__all__ = ["MoGDispatcher"]

COVARIANCE_TYPES = ("diag", "spherical")
INITS = ("kmeans++", "random", "given")
_EPS64 = torch.finfo(torch.float64).eps
_INIT_MAX_ROWS = 1 << 17  # k-means++ / Lloyd run on a random subset of at most this many rows
_LLOYD_ITERS = 10


class MoGDispatcher(nn.Module):
    """K-component Gaussian mixture with diagonal or spherical covariances that dispatches rows to components.

    Args:
        n_components: K >= 1.
        dim: D >= 1, the data dimension.
        covariance_type: "diag" (log_var is (K, D)) or "spherical" (log_var is (K,)).
        hard: forward returns the argmax component (True) or a component drawn from the posterior (False).
        backend: the ``mog_posterior`` backend: "auto" | "eager" | "cpu" | "triton" | "cuda".

    Parameters (``nn.Parameter``): ``means`` (K, D), ``log_var`` (K, D) or (K,), ``log_pi`` (K,) (unnormalised
    log weights; the op normalises them with log_softmax).

    After ``fit``: ``converged_``, ``n_iter_``, ``lower_bound_`` (mean log-likelihood per point at the last
    E-step, as sklearn) and ``lower_bounds_`` (one per iteration).
    """

    def __init__(self, n_components: int, dim: int, covariance_type: str = "diag", hard: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(n_components, int) or isinstance(n_components, bool) or n_components < 1:
            raise ValueError(f"MoGDispatcher: n_components must be an int >= 1, got {n_components!r}")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"MoGDispatcher: dim must be an int >= 1, got {dim!r}")
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"MoGDispatcher: covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
        if backend != "auto" and backend not in dispatch.BACKENDS:
            raise ValueError(f"MoGDispatcher: backend must be one of {('auto', *dispatch.BACKENDS)}, got {backend!r}")
        self.n_components = n_components
        self.dim = dim
        self.covariance_type = covariance_type
        self.hard = bool(hard)
        self.backend = backend
        self.means = nn.Parameter(torch.randn(n_components, dim))
        self.log_var = nn.Parameter(torch.zeros(n_components, dim) if covariance_type == "diag" else torch.zeros(n_components))
        self.log_pi = nn.Parameter(torch.zeros(n_components))
        self.converged_ = False
        self.n_iter_ = 0
        self.lower_bound_ = -math.inf
        self.lower_bounds_: list[float] = []

    def extra_repr(self) -> str:
        return (f"n_components={self.n_components}, dim={self.dim}, covariance_type={self.covariance_type!r}, "
                f"hard={self.hard}, backend={self.backend!r}")

    # ------------------------------------------------------------------------------------------- inputs
    def _check_x(self, x, where: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            try:
                import numpy as np
            except ImportError:  # pragma: no cover
                np = None
            if np is not None and isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
            else:
                raise ValueError(f"MoGDispatcher.{where}: x must be a torch.Tensor or numpy array, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"MoGDispatcher.{where}: x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MoGDispatcher.{where}: x must be (B, D) with D = dim = {self.dim}, got shape {tuple(x.shape)}")
        if x.device != self.means.device:
            raise ValueError(f"MoGDispatcher.{where}: x is on {x.device} but the parameters are on {self.means.device}")
        return x

    def _posterior(self, x, *, sample: bool = False, generator=None, where: str = "forward"):
        x = self._check_x(x, where)
        dtype = torch.promote_types(x.dtype, self.means.dtype)
        return mog_posterior(x.to(dtype), self.means.to(dtype), self.log_var.to(dtype), self.log_pi.to(dtype),
                             sample=sample, generator=generator, backend=self.backend)

    # ------------------------------------------------------------------------------------------- inference
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Component per row, (B,) int64: the argmax of the posterior when ``hard``, else a draw from it
        (Gumbel-max with ``generator``)."""
        if self.hard:
            return self._posterior(x, where="forward").assign
        return self._posterior(x, sample=True, generator=generator, where="forward").sample

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior probabilities p(k | x), (B, K); differentiable."""
        return self._posterior(x, where="responsibilities").log_resp.exp()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per row, (B,); differentiable in x and the parameters."""
        return self._posterior(x, where="log_prob").lse

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Mean log-likelihood per point (as sklearn's ``score``), a 0-dim tensor; ``float(...)`` for a number."""
        return self.log_prob(x).mean()

    @property
    def weights(self) -> torch.Tensor:
        """Mixture weights softmax(log_pi), (K,)."""
        return torch.softmax(self.log_pi.detach(), -1)

    @property
    def variances(self) -> torch.Tensor:
        """exp(log_var): (K, D) for "diag", (K,) for "spherical"."""
        return self.log_var.detach().exp()

    # ------------------------------------------------------------------------------------------- fitting
    def _check_fit_args(self, x, n_iter, tol, init, reg_covar, batch_size, where):
        x = self._check_x(x, where)
        if x.shape[0] < self.n_components:
            raise ValueError(f"MoGDispatcher.{where}: n_components={self.n_components} must be <= the number of "
                             f"points in x ({x.shape[0]})")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"MoGDispatcher.{where}: x contains NaN or Inf")
        if init not in INITS:
            raise ValueError(f"MoGDispatcher.{where}: init must be one of {INITS}, got {init!r}")
        if n_iter is not None and (not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 0):
            raise ValueError(f"MoGDispatcher.{where}: n_iter must be an int >= 0, got {n_iter!r}")
        if tol is not None and not (isinstance(tol, (int, float)) and tol >= 0):
            raise ValueError(f"MoGDispatcher.{where}: tol must be a number >= 0, got {tol!r}")
        if not (isinstance(reg_covar, (int, float)) and not isinstance(reg_covar, bool) and reg_covar >= 0):
            raise ValueError(f"MoGDispatcher.{where}: reg_covar must be a number >= 0, got {reg_covar!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
            raise ValueError(f"MoGDispatcher.{where}: batch_size must be None or an int >= 1, got {batch_size!r}")
        return x

    @staticmethod
    def _chunks(x, centre, batch_size):
        """Row chunks of x centred at ``centre``, in float64."""
        n = x.shape[0]
        step = n if batch_size is None else batch_size
        for i in range(0, n, max(step, 1)):
            yield x[i:i + step].to(torch.float64) - centre

    @staticmethod
    def _data_mean(x, batch_size):
        n = x.shape[0]
        step = n if batch_size is None else batch_size
        total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for i in range(0, n, step):
            total += x[i:i + step].to(torch.float64).sum(0)
        return total / n

    def _params_from_stats(self, nk, s1, s2, reg_covar):
        """M-step from float64 sufficient statistics (as sklearn's _estimate_gaussian_parameters):
        returns centred means (K, D), variances (K, D) or (K,), weights (K,)."""
        nk = nk + 10 * _EPS64
        mu = s1 / nk[:, None]
        var = s2 / nk[:, None] - mu.square() + reg_covar
        if self.covariance_type == "spherical":
            var = var.mean(1)
        if not bool(torch.isfinite(var).all()) or bool((var <= 0).any()):
            raise ValueError("MoGDispatcher.fit: some components have an ill-defined (non-positive) variance; "
                             "decrease n_components or increase reg_covar")
        return mu, var, nk / nk.sum()

    def _hard_stats(self, x, centre, centres, batch_size):
        """Sufficient statistics of the hard nearest-centre assignment (centred float64 data and centres)."""
        K, D = centres.shape
        nk = torch.zeros(K, dtype=torch.float64, device=x.device)
        s1 = torch.zeros(K, D, dtype=torch.float64, device=x.device)
        s2 = torch.zeros(K, D, dtype=torch.float64, device=x.device)
        for xc in self._chunks(x, centre, batch_size):
            lab = _nearest(xc, centres)
            nk.index_add_(0, lab, torch.ones_like(lab, dtype=torch.float64))
            s1.index_add_(0, lab, xc)
            s2.index_add_(0, lab, xc.square())
        return nk, s1, s2

    def _init_centres(self, x, centre, init, generator, batch_size):
        """Centred float64 (K, D) initial centres: k-means++ + Lloyd, or K distinct random rows."""
        n, K = x.shape[0], self.n_components
        rdev = generator.device if generator is not None else torch.device("cpu")
        if init == "random":
            idx = torch.randperm(n, generator=generator, device=rdev)[:K].to(x.device)
            return x[idx].to(torch.float64) - centre
        if n > _INIT_MAX_ROWS:
            idx = torch.randperm(n, generator=generator, device=rdev)[:_INIT_MAX_ROWS].to(x.device)
            xs = x[idx].to(torch.float64) - centre
        else:
            xs = x.to(torch.float64) - centre
        centres = _kmeans_plusplus(xs, K, generator, rdev)
        return _lloyd(xs, centres, _LLOYD_ITERS)

    @torch.no_grad()
    def initialize(self, x, init: str = "kmeans++", reg_covar: float = 1e-6, generator: torch.Generator | None = None,
                   batch_size: int | None = None) -> "MoGDispatcher":
        """Set the parameters from x without EM: "kmeans++" (k-means++ seeding and a few Lloyd iterations) or
        "random" (K distinct rows of x), then means, variances and weights from the hard nearest-centre
        assignment (so the first E-step starts where sklearn's k-means++ init leads). "given" keeps them."""
        x = self._check_fit_args(x, None, None, init, reg_covar, batch_size, "initialize")
        if init == "given":
            return self
        centre = self._data_mean(x, batch_size)
        centres = self._init_centres(x, centre, init, generator, batch_size)
        mu, var, w = self._params_from_stats(*self._hard_stats(x, centre, centres, batch_size), reg_covar)
        self._set_params(mu + centre, var, w)
        return self

    def _set_params(self, means, var, weights):
        self.means.copy_(means.to(self.means))
        self.log_var.copy_(var.log().to(self.log_var))
        self.log_pi.copy_(weights.log().to(self.log_pi))

    @torch.no_grad()
    def fit(self, x, n_iter: int = 100, tol: float = 1e-3, init: str = "kmeans++", reg_covar: float = 1e-6,
            generator: torch.Generator | None = None, verbose: bool = False,
            batch_size: int | None = None) -> "MoGDispatcher":
        """Fit by EM (as ``sklearn.mixture.GaussianMixture`` with covariance_type "diag"/"spherical", n_init=1).

        Args:
            x: (N, D) floating-point data (tensor or numpy array) on the parameters' device.
            n_iter: maximum number of EM iterations. tol: stop when the mean log-likelihood per point changes by
            less than tol between iterations (sklearn's criterion). init: "kmeans++" | "random" | "given"
            (start from the current parameters), see :meth:`initialize`. reg_covar: added to every variance.
            generator: seeds the initialisation. verbose: tqdm progress bar. batch_size: rows per chunk for the
            E-step and the statistics (None: all rows at once).

        The E-step runs :func:`mog_posterior` in the promoted dtype of x and the parameters; the statistics and
        the parameters during EM are float64, written to the parameters' dtype at the end.
        Returns self, with ``converged_``, ``n_iter_``, ``lower_bound_`` and ``lower_bounds_`` set.
        """
        x = self._check_fit_args(x, n_iter, tol, init, reg_covar, batch_size, "fit")
        centre = self._data_mean(x, batch_size)
        if init == "given":
            mu = self.means.detach().to(torch.float64) - centre
            var = self.log_var.detach().to(torch.float64).exp()
            w = torch.softmax(self.log_pi.detach().to(torch.float64), -1)
        else:
            centres = self._init_centres(x, centre, init, generator, batch_size)
            mu, var, w = self._params_from_stats(*self._hard_stats(x, centre, centres, batch_size), reg_covar)

        dtype = torch.promote_types(x.dtype, self.means.dtype)
        if dtype not in (torch.float32, torch.float64):
            dtype = torch.float32
        n = x.shape[0]
        K, D = self.n_components, self.dim
        lower_bound = -math.inf
        self.lower_bounds_ = []
        self.converged_ = False
        it = 0
        bar = None
        if verbose:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_iter, desc="MoGDispatcher.fit (EM)", unit="it")
        try:
            for it in range(1, n_iter + 1):
                prev = lower_bound
                # E-step (the fused op) + sufficient statistics in float64
                mc, lv, lp = mu.to(dtype), var.log().to(dtype), w.log().to(dtype)
                nk = torch.zeros(K, dtype=torch.float64, device=x.device)
                s1 = torch.zeros(K, D, dtype=torch.float64, device=x.device)
                s2 = torch.zeros(K, D, dtype=torch.float64, device=x.device)
                ll = torch.zeros((), dtype=torch.float64, device=x.device)
                for xc in self._chunks(x, centre, batch_size):
                    post = mog_posterior(xc.to(dtype), mc, lv, lp, backend=self.backend)
                    r = post.log_resp.to(torch.float64).exp()
                    ll += post.lse.to(torch.float64).sum()
                    nk += r.sum(0)
                    s1 += r.T @ xc
                    s2 += r.T @ xc.square()
                # M-step
                mu, var, w = self._params_from_stats(nk, s1, s2, reg_covar)
                lower_bound = float(ll) / n
                self.lower_bounds_.append(lower_bound)
                change = lower_bound - prev
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(lower_bound=f"{lower_bound:.6g}", change=f"{change:.3g}")
                if abs(change) < tol:
                    self.converged_ = True
                    break
        finally:
            if bar is not None:
                bar.close()
        self.n_iter_ = it
        self.lower_bound_ = lower_bound
        self._set_params(mu + centre, var, w)
        if not self.converged_ and n_iter > 0 and tol > 0:
            warnings.warn(f"MoGDispatcher.fit did not converge in n_iter={n_iter} iterations (tol={tol}); "
                          "increase n_iter or tol, or try another init", RuntimeWarning, stacklevel=2)
        return self


# ----------------------------------------------------------------------------------------------- k-means helpers
def _sq_dist(x, c):
    """Squared Euclidean distances (N, K) in float64; x and c are centred float64, so the expansion is accurate."""
    d = x.square().sum(1, keepdim=True) - 2.0 * (x @ c.T) + c.square().sum(1)
    return d.clamp_(min=0.0)


def _nearest(x, c):
    return _sq_dist(x, c).argmin(1)


def _kmeans_plusplus(x, K, generator, rdev):
    """Greedy k-means++ seeding (as sklearn's kmeans_plusplus: 2 + log K candidates per step, keep the one that
    lowers the potential most). x: centred float64 (n, D). Returns (K, D)."""
    n = x.shape[0]
    trials = 2 + int(math.log(K))
    first = int(torch.randint(n, (1,), generator=generator, device=rdev))
    centres = [x[first]]
    closest = _sq_dist(x, x[first:first + 1])[:, 0]
    for _ in range(1, K):
        p = closest.to(rdev)
        if not bool(p.sum() > 0):  # every point sits on a centre already: pick uniformly
            p = torch.ones_like(p)
        cand = torch.multinomial(p, trials, replacement=True, generator=generator).to(x.device)
        d = torch.minimum(closest[None, :], _sq_dist(x, x[cand]).T)  # (trials, n)
        best = int(d.sum(1).argmin())
        centres.append(x[cand[best]])
        closest = d[best]
    return torch.stack(centres)


def _lloyd(x, centres, n_iter):
    """A few Lloyd iterations; an empty cluster keeps its centre."""
    K = centres.shape[0]
    lab = None
    for _ in range(n_iter):
        new = _nearest(x, centres)
        if lab is not None and torch.equal(new, lab):
            break
        lab = new
        counts = torch.zeros(K, dtype=torch.float64, device=x.device).index_add_(0, lab, torch.ones_like(lab, dtype=torch.float64))
        sums = torch.zeros_like(centres).index_add_(0, lab, x)
        keep = counts == 0
        centres = torch.where(keep[:, None], centres, sums / counts.clamp(min=1)[:, None])
    return centres
