"""Frechet distance of classifier features (FID-style) for the 8x8 digits.

There is no Inception network for 8x8 images, so the feature extractor is a small classifier trained here on the
real digits (train split), as the mixDDPM and MoLR-MoG reproductions ask:

    clf, acc = get_digits_classifier()       # MLP 64-256-128-10, test accuracy `acc` (about 0.97)
    fid = digits_fid(samples)                # Frechet distance of 128-D penultimate features vs all real digits
    labels, hist = classify(samples)         # predicted classes and their histogram (fractions)

``frechet_distance`` is the formula of pytorch-fid: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
The trained classifier is cached per process and on disk (``$MOEKERNELS_CACHE`` or ``~/.cache/moekernels``);
training it takes a few seconds on one CPU thread and is deterministic for a seed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["frechet_distance", "feature_stats", "DigitsClassifier", "get_digits_classifier", "digits_fid",
           "classify"]

_VERSION = 1  # bump when the classifier or its training changes (invalidates the disk cache)
_CACHE: dict = {}


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 sqrtm(cov1 cov2)) in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes do not match: mu1 {mu1.shape}, cov1 {cov1.shape}, "
                         f"mu2 {mu2.shape}, cov2 {cov2.shape}")
    diff = mu1 - mu2
    # tr sqrtm(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)): symmetric PSD eigenproblems, exact for singular covariances
    # (dead ReLU features) where scipy's sqrtm(S1 S2) warns and loses accuracy.
    w, v = np.linalg.eigh((cov1 + cov1.T) / 2)
    s1h = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1h @ cov2 @ s1h
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean, 0.0))


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, F) features."""
    f = np.asarray(feats.detach().cpu() if isinstance(feats, torch.Tensor) else feats, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"feature_stats: need (N >= 2, F) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


class DigitsClassifier(nn.Module):
    """MLP 64 -> 256 -> 128 -> 10 with ReLU; ``features`` is the 128-D penultimate activation."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _cache_dir() -> Path:
    return Path(os.environ.get("MOEKERNELS_CACHE", Path.home() / ".cache" / "moekernels"))


def _train_classifier(seed: int, epochs: int = 60, batch_size: int = 64) -> DigitsClassifier:
    from moekernels.data.digits import load_digits

    x, y = load_digits("train")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = DigitsClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * (len(x) // batch_size))
    clf.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx] + 0.1 * torch.randn(len(idx), 64, generator=g)  # mild noise: robust to sample noise
            loss = nn.functional.cross_entropy(clf(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval()


def get_digits_classifier(seed: int = 0) -> tuple[DigitsClassifier, float]:
    """(classifier, accuracy on the held-out test split). Trained once per seed (cached in memory and on disk)."""
    if seed in _CACHE:
        return _CACHE[seed]
    from moekernels.data.digits import load_digits

    path = _cache_dir() / f"digits_classifier_v{_VERSION}_seed{seed}.pt"
    clf = DigitsClassifier()
    try:
        clf.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        clf.eval()
    except (OSError, RuntimeError, EOFError):
        with torch.enable_grad():  # the callers may run under no_grad
            clf = _train_classifier(seed)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(clf.state_dict(), tmp)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home is fine: the classifier is retrained next process
    xt, yt = load_digits("test")
    with torch.no_grad():
        acc = float((clf(xt).argmax(1) == yt).float().mean())
    _CACHE[seed] = (clf, acc)
    return clf, acc


def _as_digits(samples, name: str) -> torch.Tensor:
    x = torch.as_tensor(samples.detach().cpu() if isinstance(samples, torch.Tensor) else np.asarray(samples),
                        dtype=torch.float32)
    if x.ndim != 2 or x.shape[1] != 64:
        raise ValueError(f"{name} must have shape (N, 64) (8x8 digits in [-1, 1]), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


@torch.no_grad()
def digits_fid(samples, real=None, seed: int = 0) -> float:
    """Frechet distance between the classifier features of ``samples`` (N, 64) and of ``real`` (default: all
    1,797 real digits)."""
    from moekernels.data.digits import load_digits

    clf, _ = get_digits_classifier(seed)
    xs = _as_digits(samples, "samples")
    xr = load_digits("all")[0] if real is None else _as_digits(real, "real")
    return frechet_distance(*feature_stats(clf.features(xs)), *feature_stats(clf.features(xr)))


@torch.no_grad()
def classify(samples, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels (N,), histogram (10,) of label fractions) of ``samples`` (N, 64)."""
    clf, _ = get_digits_classifier(seed)
    labels = clf(_as_digits(samples, "samples")).argmax(1).numpy()
    return labels, np.bincount(labels, minlength=10) / max(len(labels), 1)
