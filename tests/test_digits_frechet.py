"""The digits data, the classifier Frechet distance and the `moekernels reproduce` method registry."""
import importlib

import numpy as np
import pytest
import torch

from moekernels.data.digits import load_digits, save_digit_grid, to_images
from moekernels.metrics.frechet import classify, digits_fid, frechet_distance


def test_digits_split_and_scale():
    x, y = load_digits()
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert x.shape == (1797, 64) and xtr.shape == (1437, 64) and xte.shape == (360, 64)
    assert x.min() == -1 and x.max() == 1 and x.dtype == torch.float32
    # disjoint, covering, stratified (every class 34-38 times in the test split)
    assert len({tuple(r) for r in xtr.tolist()} & {tuple(r) for r in xte.tolist()}) < 5  # a few duplicate images
    assert len(xtr) + len(xte) == len(x)
    assert np.bincount(yte.numpy(), minlength=10).min() >= 34
    assert torch.equal(load_digits("test")[0], xte)  # deterministic
    with pytest.raises(ValueError, match="split"):
        load_digits("val")


def test_digit_grid(tmp_path):
    x, _ = load_digits("test")
    assert to_images(x[:3]).shape == (3, 8, 8)
    save_digit_grid(x, tmp_path / "g.png", nrow=5, title="t")
    assert (tmp_path / "g.png").stat().st_size > 500
    with pytest.raises(ValueError, match="x must have shape"):
        to_images(torch.zeros(3, 10))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    S = a @ a.T
    mu = rng.normal(size=6)
    assert frechet_distance(mu, S, mu, S) == pytest.approx(0, abs=1e-8)
    # commuting (diagonal) covariances: sum (sqrt(s1) - sqrt(s2))^2 + ||dmu||^2
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    want = ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum() + 4.0
    got = frechet_distance(np.zeros(6), np.diag(s1), np.r_[2.0, np.zeros(5)], np.diag(s2))
    assert got == pytest.approx(want, rel=1e-10)
    # a singular covariance (rank 1) stays exact
    got = frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([4.0, 0.0]))
    assert got == pytest.approx(1.0, rel=1e-10)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_classifier_fid_orders_quality():
    x, y = load_digits("train")
    labels, hist = classify(load_digits("test")[0])
    assert (labels == load_digits("test")[1].numpy()).mean() > 0.9
    assert hist.sum() == pytest.approx(1.0)
    real_vs_real = digits_fid(load_digits("test")[0], x)
    noisy = digits_fid(x + 0.5 * torch.randn_like(x), x)
    uniform = digits_fid(torch.rand(500, 64) * 2 - 1, x)
    assert real_vs_real < noisy < uniform
    with pytest.raises(ValueError, match="samples"):
        digits_fid(torch.zeros(10, 63))
    with pytest.raises(ValueError, match="NaN"):
        digits_fid(torch.full((10, 64), float("nan")))


def test_reproduce_registry_points_at_methods():
    from moekernels import cli

    for name, module in cli.METHODS.items():
        spec = importlib.util.find_spec(f"moekernels.methods.{module}")
        if spec is None:
            pytest.skip(f"moekernels.methods.{module} not written yet")
        assert callable(importlib.import_module(f"moekernels.methods.{module}").main), name
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "no-such-method"])
