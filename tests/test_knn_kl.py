"""NPEET k-NN KL estimator: brute-force agreement, two Gaussians with a known KL (bits), identical distributions."""
import math

import numpy as np
import pytest

from moekernels.metrics.knn import knn_kl_divergence


def _brute(x, y, k):
    dxx = np.abs(x[:, None, :] - x[None]).max(2)
    np.fill_diagonal(dxx, np.inf)
    rho = np.sort(dxx, 1)[:, k - 1]
    nu = np.sort(np.abs(x[:, None, :] - y[None]).max(2), 1)[:, k - 1]
    n, d = x.shape
    return (math.log(len(y)) - math.log(n - 1) + d * (np.log(nu).mean() - np.log(rho).mean())) / math.log(2)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_brute_force(k):
    rng = np.random.default_rng(k)
    x, y = rng.normal(size=(300, 2)), rng.normal(size=(200, 2)) * 1.3 + 0.2
    assert knn_kl_divergence(x, y, k=k) == pytest.approx(_brute(x, y, k), rel=1e-12, abs=1e-12)


def _kl_gauss_bits(mu, s, d=2):
    """KL(N(0, I) || N(mu, s^2 I)) in bits."""
    mu = np.asarray(mu, dtype=float)
    return 0.5 * (d / s ** 2 + mu @ mu / s ** 2 - d + 2 * d * math.log(s)) / math.log(2)


@pytest.mark.parametrize("mu,s", [((1.0, 0.0), 1.5), ((0.5, -0.5), 1.2), ((0.0, 0.0), 2.0)])
def test_two_gaussians_known_kl(mu, s):
    # (q wider than p: with q narrower the k-NN estimate is biased low at these sample sizes, a known property)
    exact = _kl_gauss_bits(mu, s)
    ests = []
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        x = rng.normal(size=(20_000, 2))
        y = rng.normal(size=(5_000, 2)) * s + np.asarray(mu)
        ests.append(knn_kl_divergence(x, y, k=5))
    # sampling error of one estimate at these sizes is ~0.02 bits; allow for it and the small k-NN bias
    assert abs(np.mean(ests) - exact) < 0.06, (ests, exact)


def test_same_distribution_is_near_zero_and_bits_vs_nats():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(20_000, 2)), rng.normal(size=(5_000, 2))
    kl = knn_kl_divergence(x, y)
    assert abs(kl) < 0.05
    assert knn_kl_divergence(x, y, base=math.e) == pytest.approx(kl * math.log(2))


def test_torch_input_and_errors():
    torch = pytest.importorskip("torch")
    x = torch.randn(100, 2)
    assert math.isfinite(knn_kl_divergence(x, torch.randn(50, 2)))
    with pytest.raises(ValueError):
        knn_kl_divergence(np.zeros((10, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        knn_kl_divergence(np.random.rand(10, 2), np.random.rand(5, 2), k=5)
