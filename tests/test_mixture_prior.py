"""MixturePrior: dispatch vs sklearn, prior sampling statistics, log_prob vs scipy, effort reduction, bad input."""
import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from moekernels.data.gmm import GMM_DATASETS, gmm_log_prob, sample_gmm
from moekernels.nn import MixturePrior

pytestmark = pytest.mark.usefixtures("one_thread")


def same_partition(a, b):
    a, b = np.asarray(a), np.asarray(b)
    pairs = np.unique(a * 1000 + b)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("name", ["sep2d", "unbal2d", "unbal1d"])
def test_dispatch_matches_sklearn(name):
    spec = GMM_DATASETS[name]
    x, comp = sample_gmm(spec, 3000, seed=1, dtype=torch.float64)
    prior = MixturePrior(spec.n_components, spec.dim).fit(x, generator=torch.Generator().manual_seed(0))
    k = prior.dispatch(x).numpy()
    gm = GaussianMixture(spec.n_components, covariance_type="diag", random_state=0).fit(x.numpy())
    km = KMeans(spec.n_components, n_init=3, random_state=0).fit(x.numpy())
    assert same_partition(k, gm.predict(x.numpy()))
    assert same_partition(k, km.labels_)
    assert same_partition(k, comp.numpy())
    # centres are the cluster means and the weights the cluster fractions
    for j in range(spec.n_components):
        np.testing.assert_allclose(prior.centres[j].numpy(), x.numpy()[k == j].mean(0), atol=1e-3)
        assert float(prior.weights[j]) == pytest.approx(np.mean(k == j), abs=1e-3)


def test_soft_dispatch_draws_from_the_posterior():
    x, _ = sample_gmm(GMM_DATASETS["sep1d"], 2000, seed=2)
    prior = MixturePrior(4, 1, hard=False).fit(x, generator=torch.Generator().manual_seed(0))
    c = prior.centres[:, 0].sort().values
    mid = torch.full((4000, 1), float(c[:2].mean()))  # half way between two neighbouring centres
    k = prior.dispatch(mid, generator=torch.Generator().manual_seed(1))
    r = prior.dispatcher.responsibilities(mid[:1])[0].detach()
    assert (r > 0.1).sum() == 2, r  # an ambiguous point: the argmax would give one component every time
    frac = torch.bincount(k, minlength=4).double() / len(k)
    np.testing.assert_allclose(frac.numpy(), r.double().numpy(), atol=0.03)


def test_sample_has_the_prior_statistics():
    prior = MixturePrior(3, 2)
    with torch.no_grad():
        prior.dispatcher.means.copy_(torch.tensor([[5.0, 0.0], [-4.0, 2.0], [0.0, -7.0]]))
        prior.dispatcher.log_pi.copy_(torch.tensor([0.6, 0.3, 0.1]).log())
    prior.fitted = True
    x, k = prior.sample(30000, generator=torch.Generator().manual_seed(0), return_components=True, dtype=torch.float64)
    c, p = prior.centres.double(), torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    np.testing.assert_allclose((torch.bincount(k, minlength=3) / len(k)).numpy(), p.numpy(), atol=0.01)
    for j in range(3):
        xj = x[k == j]
        np.testing.assert_allclose(xj.mean(0).numpy(), c[j].numpy(), atol=0.05)
        np.testing.assert_allclose(np.cov(xj.numpy().T), np.eye(2), atol=0.06)
    m = p @ c  # mixture mean and covariance I + sum_k p_k (c_k - m)(c_k - m)^T
    cov = torch.eye(2, dtype=torch.float64) + ((c - m).T * p) @ (c - m)
    np.testing.assert_allclose(x.mean(0).numpy(), m.numpy(), atol=0.1)
    np.testing.assert_allclose(np.cov(x.numpy().T), cov.numpy(), rtol=0.05)


def test_log_prob_matches_scipy():
    x, _ = sample_gmm(GMM_DATASETS["unbal2d"], 500, seed=3, dtype=torch.float64)
    prior = MixturePrior(4, 2, std=1.5).fit(x, generator=torch.Generator().manual_seed(0))
    y = torch.randn(50, 2, dtype=torch.float64) * 5
    c = prior.centres.double().numpy()
    logp = torch.log_softmax(prior.dispatcher.log_pi.detach().double(), 0).numpy()
    ref = logsumexp([logp[j] + multivariate_normal(c[j], 1.5 ** 2 * np.eye(2)).logpdf(y.numpy()) for j in range(4)], axis=0)
    np.testing.assert_allclose(prior.log_prob(y).numpy(), ref, rtol=1e-10, atol=1e-10)


def test_standard_prior_and_effort_reduction():
    std = MixturePrior.standard(3)
    x = std.sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(std.dispatch(x), torch.zeros(5, dtype=torch.long)) and std.effort_reduction() == 0.0
    spec = GMM_DATASETS["unbal2d"]
    x, _ = sample_gmm(spec, 4000, seed=4, dtype=torch.float64)
    prior = MixturePrior(4, 2).fit(x, generator=torch.Generator().manual_seed(0))
    c = prior.centres_of(prior.dispatch(x), torch.float64)
    # E||x0||^2 - E||x0 - c_k(x0)||^2 = sum_k p_k ||c_k||^2 when c_k are the cluster means, p_k the fractions
    direct = float(x.square().sum(1).mean() - (x - c).square().sum(1).mean())
    assert prior.effort_reduction() == pytest.approx(direct, rel=1e-4)
    means, _, weights = spec.arrays()
    assert prior.effort_reduction() == pytest.approx(float((weights * (means ** 2).sum(1)).sum()), rel=0.03)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="std"):
        MixturePrior(2, 2, std=0.0)
    with pytest.raises(ValueError, match="n_components"):
        MixturePrior(0, 2)
    prior = MixturePrior(2, 2)
    with pytest.raises(RuntimeError, match="fit"):
        prior.sample(3)
    prior.fitted = True
    with pytest.raises(ValueError, match="n must"):
        prior.sample(0)
    with pytest.raises(ValueError, match=r"k must lie in \[0, 2\)"):
        prior.centres_of(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="k must be"):
        prior.centres_of(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="D = dim = 2"):
        prior.dispatch(torch.zeros(3, 5))


@pytest.mark.parametrize("name", sorted(GMM_DATASETS))
def test_gmm_sets_log_prob_and_separation(name):
    spec = GMM_DATASETS[name]
    means, stds, weights = spec.arrays()
    x, comp = sample_gmm(spec, 400, seed=6, dtype=torch.float64)
    ref = logsumexp([np.log(weights[j]) + multivariate_normal(means[j], stds[j] ** 2 * np.eye(spec.dim)).logpdf(x.numpy())
                     for j in range(spec.n_components)], axis=0)
    np.testing.assert_allclose(gmm_log_prob(spec, x).numpy(), ref.reshape(-1), rtol=1e-10, atol=1e-10)
    # the module docstring: modes more than 10 std apart; the draws' components have the spec's weights
    d = np.linalg.norm(means[:, None] - means[None], axis=-1) + np.diag([np.inf] * spec.n_components)
    assert d.min() > 10 * stds.max()
    np.testing.assert_allclose(np.bincount(comp.numpy(), minlength=spec.n_components) / 400, weights, atol=0.08)
    with pytest.raises(ValueError, match="x must be"):
        gmm_log_prob(spec, torch.zeros(3, spec.dim + 1))
    with pytest.raises(ValueError, match="spec must"):
        gmm_log_prob(name, x)
