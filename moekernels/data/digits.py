"""scikit-learn's 8x8 handwritten digits (1,797 images, 64-D, 10 classes; the UCI optical recognition set shipped
with scikit-learn), scaled to [-1, 1] for diffusion models.

    x, y = load_digits("train")          # (1437, 64) float32 in [-1, 1], (1437,) int64
    save_digit_grid(samples, "grid.png")  # a PNG of up to nrow x nrow images

The train/test split is deterministic and stratified (360 test images, ``random_state=0``).
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

__all__ = ["load_digits", "to_images", "save_digit_grid", "N_TEST"]

N_TEST = 360
_SPLITS = ("all", "train", "test")


@lru_cache(maxsize=None)
def _arrays():
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency of the methods extra
        raise ImportError("the digits data needs scikit-learn (pip install scikit-learn)") from e
    d = _sk_load_digits()
    x = (d.data.astype(np.float32) / 16.0) * 2.0 - 1.0
    y = d.target.astype(np.int64)
    idx = np.arange(len(x))
    tr, te = train_test_split(idx, test_size=N_TEST, random_state=0, stratify=y)
    return x, y, np.sort(tr), np.sort(te)


def load_digits(split: str = "all", dtype: torch.dtype = torch.float32):
    """(x, y): x (N, 64) in [-1, 1] (pixel / 16 * 2 - 1), y (N,) int64 labels. ``split``: all | train | test."""
    if split not in _SPLITS:
        raise ValueError(f"load_digits: split must be one of {_SPLITS}, got {split!r}")
    x, y, tr, te = _arrays()
    sel = {"all": slice(None), "train": tr, "test": te}[split]
    return torch.as_tensor(x[sel], dtype=dtype), torch.as_tensor(y[sel])


def to_images(x) -> np.ndarray:
    """(N, 64) in [-1, 1] -> (N, 8, 8) in [0, 1] (clipped), for plotting."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != 2 or x.shape[1] != 64:
        raise ValueError(f"to_images: x must have shape (N, 64), got {tuple(x.shape)}")
    return np.clip((x.reshape(-1, 8, 8) + 1.0) / 2.0, 0.0, 1.0)


def save_digit_grid(x, path: str | os.PathLike, nrow: int = 10, title: str | None = None) -> None:
    """Save the first nrow*nrow images of x (N, 64) as a grid PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = to_images(x)[: nrow * nrow]
    rows = -(-len(imgs) // nrow)
    canvas = np.ones((rows * 9 + 1, nrow * 9 + 1))
    for i, im in enumerate(imgs):
        r, c = divmod(i, nrow)
        canvas[1 + 9 * r: 9 + 9 * r, 1 + 9 * c: 9 + 9 * c] = im
    fig, ax = plt.subplots(figsize=(nrow * 0.5 + 0.5, rows * 0.5 + 0.7))
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
