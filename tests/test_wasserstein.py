"""Exact 1-D Wasserstein, sliced Wasserstein and mode coverage against known answers."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from moekernels.metrics.wasserstein import mode_coverage, random_directions, sliced_wasserstein, wasserstein_1d

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n,m", [(37, 53), (100, 100), (1, 7)])
def test_w1_matches_scipy(n, m):
    r = np.random.default_rng(n * 1000 + m)
    x, y = r.normal(size=n), r.normal(size=m) * 2 + 1
    assert wasserstein_1d(x, y) == pytest.approx(wasserstein_distance(x, y), rel=1e-12, abs=1e-12)
    assert wasserstein_1d(torch.from_numpy(x)[:, None], y) == pytest.approx(wasserstein_distance(x, y), rel=1e-12)


def test_known_answers():
    x = np.random.default_rng(0).normal(size=500)
    for p in (1, 2, 3):
        assert wasserstein_1d(x, x + 2.5, p=p) == pytest.approx(2.5, rel=1e-12)  # a shift moves every quantile
    assert wasserstein_1d([0.0], [1.0, 3.0], p=1) == pytest.approx(2.0)
    assert wasserstein_1d([0.0], [1.0, 3.0], p=2) == pytest.approx(math.sqrt(5.0))
    assert wasserstein_1d([0.0, 1.0], [0.0, 0.0, 1.0, 1.0]) == pytest.approx(0.0, abs=1e-15)
    # unequal sizes, hand-computed: F_x = {0: 1/3, 1: 2/3, 2: 1}, F_y = {0.5: 1/2, 1.5: 1}
    assert wasserstein_1d([0.0, 1.0, 2.0], [0.5, 1.5]) == pytest.approx(1 / 3 * 0.5 + 1 / 6 * 0.5 + 1 / 6 * 0.5 + 1 / 3 * 0.5)


def test_sliced():
    r = np.random.default_rng(1)
    x = r.normal(size=(400, 2))
    m = np.array([3.0, 4.0])
    # translation: each projection's W1 is |theta . m| exactly; E|theta . m| = 2 ||m|| / pi on the circle
    assert sliced_wasserstein(x, x + m, n_projections=4000, seed=3) == pytest.approx(2 * 5 / math.pi, rel=0.03)
    assert sliced_wasserstein(x, x.copy()) == pytest.approx(0.0, abs=1e-12)
    x1, y1 = r.normal(size=(50, 1)), r.normal(size=(70, 1))
    assert sliced_wasserstein(x1, y1) == pytest.approx(wasserstein_distance(x1[:, 0], y1[:, 0]), rel=1e-12)
    # SW2 of a translation: sqrt(E (theta . m)^2) = ||m|| / sqrt(2) in 2-D
    assert sliced_wasserstein(x, x + m, n_projections=4000, p=2, seed=4) == pytest.approx(5 / math.sqrt(2), rel=0.03)


def test_mode_coverage():
    from moekernels.data.gmm import GMM_DATASETS, sample_gmm

    spec = GMM_DATASETS["unbal2d"]
    means, stds, weights = spec.arrays()
    x, _ = sample_gmm(spec, 20000, seed=5)
    cov = mode_coverage(x, means, stds, weights)
    assert cov["tv"] < 0.02 and cov["modes_covered"] == 4
    np.testing.assert_allclose(cov["fractions"], cov["expected"], atol=0.01)
    one = torch.tensor(means[:1]).repeat(100, 1)  # every sample on mode 0
    cov = mode_coverage(one, means, stds, weights)
    assert cov["min_ratio"] == 0.0 and cov["modes_covered"] == 1 and cov["fractions"][0] == 1.0


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="p must"):
        wasserstein_1d([0.0], [1.0], p=0.5)
    with pytest.raises(ValueError, match="x must"):
        wasserstein_1d(np.zeros((3, 2)), [1.0])
    with pytest.raises(ValueError, match="y must"):
        wasserstein_1d([1.0], "abc")
    with pytest.raises(ValueError, match="same D"):
        sliced_wasserstein(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(np.zeros((3, 2)), np.zeros((3, 2)), n_projections=0)
    with pytest.raises(ValueError, match="stds and weights"):
        mode_coverage(np.zeros((3, 2)), np.zeros((2, 2)), [1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        mode_coverage(np.zeros((3, 2)), np.zeros((2, 2)), [1.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="stds must"):
        mode_coverage(np.zeros((3, 2)), np.zeros((2, 2)), [1.0, -1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="x must have"):
        mode_coverage(np.zeros((0, 2)), np.zeros((2, 2)), [1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="radius"):
        mode_coverage(np.zeros((3, 2)), np.zeros((2, 2)), [1.0, 1.0], [0.5, 0.5], radius=0.0)
    with pytest.raises(ValueError, match="x must be numeric"):
        wasserstein_1d(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="dim must"):
        random_directions(5, 0)
