"""Wasserstein distances between samples, and mode coverage of a known mixture.

* ``wasserstein_1d(x, y, p=1)``: the exact W_p between two 1-D empirical distributions (any sizes),
  W_p^p = int_0^1 |F^-1(u) - G^-1(u)|^p du, evaluated exactly on the union of the two quantile grids
  {i/n} u {j/m} (both quantile functions are piecewise constant there). p = 1 equals
  ``scipy.stats.wasserstein_distance``.
* ``sliced_wasserstein(x, y, n_projections=256, p=1, seed=0)``: SW_p = (E_theta W_p(theta.x, theta.y)^p)^(1/p)
  over directions theta uniform on the unit sphere (a fixed seeded set, so numbers are reproducible).
* ``mode_coverage(x, means, stds, weights, radius=3)``: fraction of samples within ``radius`` std of each true
  mode (Euclidean), compared with the fraction the true mixture puts there (weight_k * P(chi_D <= radius)).
"""
from __future__ import annotations


import numpy as np
import torch

__all__ = ["wasserstein_1d", "sliced_wasserstein", "random_directions", "mode_coverage"]


def _as_tensor(a, name: str, where: str) -> torch.Tensor:
    if isinstance(a, (list, tuple)):
        try:
            a = np.asarray(a, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {name} must be numeric, got a {type(a).__name__} that is not") from None
    if isinstance(a, np.ndarray) and a.dtype.kind in "fiu":
        a = torch.from_numpy(a)
    if not isinstance(a, torch.Tensor):
        raise ValueError(f"{where}: {name} must be a numeric torch.Tensor, numpy array or list, got {type(a).__name__}")
    if not a.is_floating_point():
        a = a.to(torch.float64)
    return a.detach().to(torch.float64).cpu()


def _quantile_grid(n: int, m: int):
    """Interval lengths du and the index of each quantile function on every interval of the merged grid."""
    u = torch.unique(torch.cat((torch.arange(1, n + 1, dtype=torch.float64) / n,
                                torch.arange(1, m + 1, dtype=torch.float64) / m)))
    u = torch.cat((torch.zeros(1, dtype=torch.float64), u))
    du = u[1:] - u[:-1]
    keep = du > 1e-15
    mid = (0.5 * (u[1:] + u[:-1]))[keep]
    ix = (mid * n).floor().long().clamp_(max=n - 1)
    iy = (mid * m).floor().long().clamp_(max=m - 1)
    return du[keep], ix, iy


def _wp_sorted(xs: torch.Tensor, ys: torch.Tensor, p: float) -> torch.Tensor:
    """W_p^p between the columns of sorted xs (n, L) and ys (m, L): (L,)."""
    n, m = xs.shape[0], ys.shape[0]
    if n == m:
        return (xs - ys).abs().pow(p).mean(0)
    du, ix, iy = _quantile_grid(n, m)
    return ((xs[ix] - ys[iy]).abs().pow(p) * du[:, None]).sum(0)


def _check_p(p, where):
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not p >= 1:
        raise ValueError(f"{where}: p must be a number >= 1, got {p!r}")


def wasserstein_1d(x, y, p: float = 1) -> float:
    """Exact W_p between 1-D samples x (n,) or (n, 1) and y (m,) or (m, 1) (tensors or numpy arrays)."""
    where = "wasserstein_1d"
    _check_p(p, where)
    x, y = _as_tensor(x, "x", where), _as_tensor(y, "y", where)
    for name, a in (("x", x), ("y", y)):
        if not (a.dim() == 1 or (a.dim() == 2 and a.shape[1] == 1)) or a.numel() == 0:
            raise ValueError(f"{where}: {name} must be a non-empty (n,) or (n, 1) array, got shape {tuple(a.shape)}")
    xs, ys = x.reshape(-1, 1).sort(0).values, y.reshape(-1, 1).sort(0).values
    return float(_wp_sorted(xs, ys, p)[0] ** (1.0 / p))


def random_directions(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """n directions uniform on the unit sphere of R^dim (float64, seeded)."""
    for name, v in (("n", n), ("dim", dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"random_directions: {name} must be an int >= 1, got {v!r}")
    g = torch.Generator().manual_seed(int(seed))
    th = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return th / th.norm(dim=1, keepdim=True)


def sliced_wasserstein(x, y, n_projections: int = 256, p: float = 1, seed: int = 0) -> float:
    """Sliced W_p between x (n, D) and y (m, D): (mean over projections of W_p^p)^(1/p). In 1-D it is W_p."""
    where = "sliced_wasserstein"
    _check_p(p, where)
    if not isinstance(n_projections, int) or isinstance(n_projections, bool) or n_projections < 1:
        raise ValueError(f"{where}: n_projections must be an int >= 1, got {n_projections!r}")
    x, y = _as_tensor(x, "x", where), _as_tensor(y, "y", where)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"{where}: x and y must be non-empty (n, D) and (m, D) with the same D, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    D = x.shape[1]
    theta = torch.ones(1, 1, dtype=torch.float64) if D == 1 else random_directions(n_projections, D, seed)
    xs, ys = (x @ theta.T).sort(0).values, (y @ theta.T).sort(0).values
    return float(_wp_sorted(xs, ys, p).mean() ** (1.0 / p))


def mode_coverage(x, means, stds, weights, radius: float = 3.0) -> dict:
    """Per-mode sample fractions within ``radius`` * std_k of mean_k (Euclidean), against the true mixture.

    Returns a dict: ``fractions`` (K,) observed, ``expected`` (K,) = weight_k * P(chi_D <= radius),
    ``off_mode`` (fraction in no ball) and ``expected_off``, ``tv`` (total variation between the observed and
    expected (K + 1)-category distributions: 0 is perfect), ``min_ratio`` (min_k fraction_k / expected_k: 0 when
    a mode is missed) and ``modes_covered`` (modes with at least half their expected fraction).
    """
    where = "mode_coverage"
    x = _as_tensor(x, "x", where)
    means, stds, weights = (np.asarray(a, dtype=np.float64) for a in (means, stds, weights))
    if x.dim() != 2 or means.ndim != 2 or means.shape[1] != x.shape[1]:
        raise ValueError(f"{where}: x must be (n, D) and means (K, D) with the same D, got shapes "
                         f"{tuple(x.shape)} and {means.shape}")
    K, D = means.shape
    if stds.shape != (K,) or weights.shape != (K,):
        raise ValueError(f"{where}: stds and weights must be (K,)=({K},), got {stds.shape} and {weights.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: x must have at least one row")
    if not (np.isfinite(stds).all() and (stds > 0).all()):
        raise ValueError(f"{where}: stds must be finite and > 0, got {stds.tolist()}")
    if not (np.isfinite(weights).all() and (weights > 0).all()):
        raise ValueError(f"{where}: weights must be finite and > 0 (every mode of the true mixture), got "
                         f"{weights.tolist()}")
    if not (isinstance(radius, (int, float)) and not isinstance(radius, bool) and 0 < radius < float("inf")):
        raise ValueError(f"{where}: radius must be a finite number > 0, got {radius!r}")
    from scipy.stats import chi2

    d = torch.cdist(x, torch.from_numpy(means))  # (n, K)
    inside = (d <= radius * torch.from_numpy(stds)[None, :]).numpy()
    frac = inside.mean(0)
    p_in = float(chi2.cdf(radius ** 2, D))
    expected = weights / weights.sum() * p_in
    off = float(1.0 - inside.any(1).mean())
    tv = 0.5 * (np.abs(frac - expected).sum() + abs(off - (1.0 - p_in)))
    ratio = frac / expected
    return {"fractions": frac.tolist(), "expected": expected.tolist(), "off_mode": off,
            "expected_off": 1.0 - p_in, "tv": float(tv), "min_ratio": float(ratio.min()),
            "modes_covered": int((ratio >= 0.5).sum()), "n_modes": int(K)}
