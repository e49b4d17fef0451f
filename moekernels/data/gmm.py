"""Synthetic Gaussian mixtures with known modes (the mixDDPM / mixSGM synthetic experiments).

    spec = GMM_DATASETS["sep2d"]
    x, comp = sample_gmm(spec, 5000, seed=0)     # (n, D) float32, (n,) int64 true component
    spec.means, spec.stds, spec.weights

Four sets, modes away from the origin so that a standard N(0, I) prior is far from most of the data:

=========  ===  =====================================================  ====================  =====
name       D    means                                                  weights               std
=========  ===  =====================================================  ====================  =====
sep1d      1    -9, -3, 3, 9                                           equal                 0.5
unbal1d    1    -6, 0, 6                                               0.75, 0.20, 0.05      0.5
sep2d      2    8 on a circle of radius 8                              equal                 0.5
unbal2d    2    (6, 6), (-6, 6), (-6, -6), (6, -6)                     0.55, 0.25, 0.15, 0.05 0.6
=========  ===  =====================================================  ====================  =====

Every component is isotropic N(mean_k, std_k^2 I); modes are > 10 std apart, so "within 3 std of mode k"
(the mode-coverage metric) is unambiguous.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GMMSpec", "GMM_DATASETS", "sample_gmm", "get_gmm", "gmm_log_prob"]


@dataclass(frozen=True)
class GMMSpec:
    """An isotropic Gaussian mixture: means (K, D), stds (K,), weights (K,) summing to 1."""

    name: str
    means: tuple
    stds: tuple
    weights: tuple

    @property
    def dim(self) -> int:
        return len(self.means[0])

    @property
    def n_components(self) -> int:
        return len(self.means)

    def arrays(self):
        """(means (K, D), stds (K,), weights (K,)) as float64 numpy arrays."""
        return (np.asarray(self.means, dtype=np.float64), np.asarray(self.stds, dtype=np.float64),
                np.asarray(self.weights, dtype=np.float64))


def _circle(k: int, r: float):
    return tuple((r * math.cos(2 * math.pi * i / k), r * math.sin(2 * math.pi * i / k)) for i in range(k))


GMM_DATASETS = {
    "sep1d": GMMSpec("sep1d", ((-9.0,), (-3.0,), (3.0,), (9.0,)), (0.5,) * 4, (0.25,) * 4),
    "unbal1d": GMMSpec("unbal1d", ((-6.0,), (0.0,), (6.0,)), (0.5,) * 3, (0.75, 0.20, 0.05)),
    "sep2d": GMMSpec("sep2d", _circle(8, 8.0), (0.5,) * 8, (0.125,) * 8),
    "unbal2d": GMMSpec("unbal2d", ((6.0, 6.0), (-6.0, 6.0), (-6.0, -6.0), (6.0, -6.0)), (0.6,) * 4,
                       (0.55, 0.25, 0.15, 0.05)),
}


def sample_gmm(spec: GMMSpec, n: int, seed: int = 0, dtype=torch.float32):
    """n draws (x (n, D), component (n,) int64) from ``spec`` with a seeded generator."""
    if not isinstance(spec, GMMSpec):
        raise ValueError(f"sample_gmm: spec must be a GMMSpec, got {type(spec).__name__}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"sample_gmm: n must be an int >= 1, got {n!r}")
    means, stds, weights = (torch.from_numpy(a) for a in spec.arrays())
    g = torch.Generator().manual_seed(int(seed))
    comp = torch.multinomial(weights, n, replacement=True, generator=g)
    x = means[comp] + stds[comp, None] * torch.randn(n, spec.dim, generator=g, dtype=torch.float64)
    return x.to(dtype), comp


def get_gmm(name: str, n: int, seed: int = 0, dtype=torch.float32):
    """``sample_gmm(GMM_DATASETS[name], n, seed)``."""
    if name not in GMM_DATASETS:
        raise ValueError(f"get_gmm: name must be one of {sorted(GMM_DATASETS)}, got {name!r}")
    return sample_gmm(GMM_DATASETS[name], n, seed, dtype)


def gmm_log_prob(spec: GMMSpec, x: torch.Tensor) -> torch.Tensor:
    """Exact log-density of the mixture at x (n, D), float64 (via the fused ``mog_posterior`` op)."""
    from moekernels.ops.mog_posterior import mog_posterior

    if not isinstance(spec, GMMSpec):
        raise ValueError(f"gmm_log_prob: spec must be a GMMSpec, got {type(spec).__name__}")
    means, stds, weights = (torch.from_numpy(a) for a in spec.arrays())
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() != 2 or x.shape[1] != spec.dim:
        raise ValueError(f"gmm_log_prob: x must be (n, D) with D = {spec.dim} for {spec.name!r}, got shape "
                         f"{tuple(x.shape)}")
    return mog_posterior(x, means, 2 * stds.log(), weights.log()).lse
