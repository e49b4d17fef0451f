"""The four 2-D toy sets of the tiny-diffusion / DualDiff baseline: ``moons``, ``line``, ``circle``, ``dino``.

Each generator reproduces the public baseline's draws exactly (same seeds, same draw order), so the same
100,000 points come out:

* ``moons``: ``sklearn.datasets.make_moons(n, noise=0.03, random_state=42)``, then x <- (x + 0.3) * 2 - 1,
  y <- (y + 0.3) * 3 - 1.
* ``line``: ``rng = numpy.random.default_rng(42)``; x ~ U(-0.5, 0.5) (n draws), then y ~ U(-1, 1) (n draws);
  both times 4.
* ``circle``: same rng; x = round(U(-0.5, 0.5) / 2, 1) * 2, then y likewise; both divided by
  sqrt(x^2 + y^2) + 1e-10; theta = 2 pi U(0, 1), r = U(0, 0.03); add r (cos theta, sin theta); times 3
  (draw order x, y, theta, r). The result is 16 small blobs on a circle of radius 3 plus one at the origin.
* ``dino``: the 142 points of the "dino" member of the Datasaurus Dozen (Matejka & Fitzmaurice, "Same Stats,
  Different Graphs: Generating Datasets with Varied Appearance and Identical Statistics through Simulated
  Annealing", CHI 2017; the points ship in ``moekernels/data/datasaurus_dino.tsv``); same rng;
  ix = rng.integers(0, 142, n); x = x[ix] + 0.15 N(0, 1) (n draws), then y likewise;
  x <- (x / 54 - 1) * 4, y <- (y / 48 - 1) * 4.

All return a float32 array of shape (n, 2).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "get_dataset", "moons_dataset", "line_dataset", "circle_dataset", "dino_dataset",
           "dino_points"]

DINO_TSV = Path(__file__).resolve().parent / "datasaurus_dino.tsv"


def moons_dataset(n: int = 100_000) -> np.ndarray:
    from sklearn.datasets import make_moons

    X, _ = make_moons(n_samples=n, random_state=42, noise=0.03)
    x = (X[:, 0] + 0.3) * 2 - 1
    y = (X[:, 1] + 0.3) * 3 - 1
    return np.stack((x, y), axis=1).astype(np.float32)


def line_dataset(n: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(42)
    x = rng.uniform(-0.5, 0.5, n)
    y = rng.uniform(-1, 1, n)
    return (np.stack((x, y), axis=1) * 4).astype(np.float32)


def circle_dataset(n: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(42)
    x = np.round(rng.uniform(-0.5, 0.5, n) / 2, 1) * 2
    y = np.round(rng.uniform(-0.5, 0.5, n) / 2, 1) * 2
    norm = np.sqrt(x ** 2 + y ** 2) + 1e-10
    x /= norm
    y /= norm
    theta = 2 * np.pi * rng.uniform(0, 1, n)
    r = rng.uniform(0, 0.03, n)
    x += r * np.cos(theta)
    y += r * np.sin(theta)
    return (np.stack((x, y), axis=1) * 3).astype(np.float32)


def dino_points() -> np.ndarray:
    """The 142 raw (x, y) points of the Datasaurus dino (float64, shape (142, 2))."""
    return np.loadtxt(DINO_TSV, delimiter="\t", skiprows=1, dtype=np.float64)


def dino_dataset(n: int = 100_000) -> np.ndarray:
    pts = dino_points()
    rng = np.random.default_rng(42)
    ix = rng.integers(0, len(pts), n)
    x = pts[ix, 0] + rng.normal(size=n) * 0.15
    y = pts[ix, 1] + rng.normal(size=n) * 0.15
    x = (x / 54 - 1) * 4
    y = (y / 48 - 1) * 4
    return np.stack((x, y), axis=1).astype(np.float32)


DATASETS = {"circle": circle_dataset, "dino": dino_dataset, "line": line_dataset, "moons": moons_dataset}


def get_dataset(name: str, n: int = 100_000) -> np.ndarray:
    """One of ``circle``, ``dino``, ``line``, ``moons`` as a float32 (n, 2) array."""
    try:
        return DATASETS[name](n)
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}") from None
