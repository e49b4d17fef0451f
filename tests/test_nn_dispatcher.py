"""MoGDispatcher: EM fit vs sklearn.mixture.GaussianMixture, chunked statistics, determinism, soft dispatch
draws, bad inputs. The E-step is the fused mog_posterior op on the backend under test."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from sklearn.mixture import GaussianMixture

from moekernels.nn import MoGDispatcher
from moekernels.ops.dispatch import environment_reasons
from moekernels.ops.mog_posterior import mog_posterior, mog_posterior_ref

BACKENDS = ["eager", "cpu"]


def backend_or_skip(backend):
    """Skip when the backend cannot run here: no compiled extension, or its CPU kernel is not registered yet."""
    reasons = environment_reasons(backend)
    if reasons:
        pytest.skip(f"{backend} backend unavailable: " + "; ".join(reasons))
    x = torch.randn(3, 2, dtype=torch.float64)
    try:
        mog_posterior(x, x[:2].clone(), torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                      backend=backend)
    except NotImplementedError as e:
        pytest.skip(f"{backend} backend: torch.ops.moekernels.mog_posterior_fwd has no implementation here yet "
                    f"({str(e).splitlines()[0][:120]})")


def blobs(N, D, K, *, offset=0.0, sep=8.0, seed=0, dtype=torch.float64):
    """K well-separated clusters (centres pairwise >= sep apart) with per-dimension scales in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        means = torch.randn(K, D, generator=g, dtype=torch.float64) * sep
        if K == 1 or torch.pdist(means).min() >= sep:
            break
    scale = torch.rand(K, D, generator=g, dtype=torch.float64) + 0.5
    weights = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    comp = torch.multinomial(weights / weights.sum(), N, replacement=True, generator=g)
    x = means[comp] + offset + torch.randn(N, D, generator=g, dtype=torch.float64) * scale[comp]
    return x.to(dtype), comp


def same_partition(a, b):
    """Labels equal up to a permutation."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = np.unique(a * 1000 + b)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def sk_init_from(d):
    """sklearn's weights_init / means_init / precisions_init from a (float64) dispatcher's parameters."""
    return dict(weights_init=d.weights.double().numpy(), means_init=d.means.detach().double().numpy(),
                precisions_init=(1.0 / d.variances.double()).numpy())


# ----------------------------------------------------------------------------------------------- vs sklearn
CASES = [  # N, D, K, offset, dtype
    (1500, 3, 3, 0.0, torch.float64),
    (2000, 6, 5, 1e3, torch.float64),
    (1200, 4, 4, 1e3, torch.float32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cov", ["diag", "spherical"])
@pytest.mark.parametrize("N,D,K,offset,dtype", CASES)
def test_fit_matches_sklearn(backend, cov, N, D, K, offset, dtype):
    backend_or_skip(backend)
    x, _ = blobs(N, D, K, offset=offset, seed=N + D + K)
    d = MoGDispatcher(K, D, covariance_type=cov, backend=backend).to(dtype)
    d.fit(x.to(dtype), tol=1e-6, generator=torch.Generator().manual_seed(0))
    sk = GaussianMixture(K, covariance_type=cov, tol=1e-6, init_params="kmeans", random_state=0).fit(x.numpy())
    assert d.converged_ and sk.converged_
    ours = float(d.score(x.to(dtype)).detach())
    assert abs(ours - sk.score(x.numpy())) < 1e-3
    assert abs(d.lower_bound_ - sk.lower_bound_) < 1e-3
    assert same_partition(d(x.to(dtype)).numpy(), sk.predict(x.numpy()))
    assert d.log_var.shape == ((K, D) if cov == "diag" else (K,))
    assert d.means.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cov", ["diag", "spherical"])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_em_iterations_match_sklearn_from_same_init(backend, cov, offset):
    """Start sklearn from our k-means++ init; after the same number of EM steps the parameters agree tightly.
    Overlapping clusters so every iteration moves the parameters."""
    backend_or_skip(backend)
    N, D, K, steps = 900, 4, 4, 7
    x, _ = blobs(N, D, K, offset=offset, sep=2.0, seed=7)
    d = MoGDispatcher(K, D, covariance_type=cov, backend=backend).double()
    d.initialize(x, generator=torch.Generator().manual_seed(3))
    init = sk_init_from(d)
    # sklearn on the raw data, and on data centred at its mean (sklearn works uncentred: far from the origin its
    # own float64 cancellation, E[x^2] - E[x]^2 at |x| ~ 1e3, is ~1e-10; the centred run is the tight reference)
    shift = x.mean(0).numpy()
    sk_raw = GaussianMixture(K, covariance_type=cov, max_iter=steps, tol=0.0, **init)
    sk = GaussianMixture(K, covariance_type=cov, max_iter=steps, tol=0.0, **{**init, "means_init": init["means_init"] - shift})
    with pytest.warns(Warning):  # sklearn: ConvergenceWarning (tol=0 never converges)
        sk_raw.fit(x.numpy())
    with pytest.warns(Warning):
        sk.fit(x.numpy() - shift)
    before = d.means.detach().clone()
    d.fit(x, n_iter=steps, tol=0.0, init="given")
    assert d.n_iter_ == sk.n_iter_ == steps and not d.converged_
    assert (d.means.detach() - before).abs().max() > 1e-2  # EM did move the means
    np.testing.assert_allclose(d.lower_bounds_, sk.lower_bounds_, rtol=0, atol=1e-11)
    np.testing.assert_allclose(d.lower_bounds_, sk_raw.lower_bounds_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(d.means.detach().numpy() - shift, sk.means_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(d.variances.numpy(), sk.covariances_, rtol=1e-9, atol=0)
    np.testing.assert_allclose(d.weights.numpy(), sk.weights_, rtol=1e-10, atol=0)
    np.testing.assert_allclose(d.log_prob(x).detach().numpy(), sk.score_samples(x.numpy() - shift), rtol=0, atol=1e-9)


@pytest.mark.parametrize("cov", ["diag", "spherical"])
def test_convergence_criterion_matches_sklearn(cov):
    """Stop when |change of the mean log-likelihood| < tol, at the same iteration as sklearn from the same init."""
    x, _ = blobs(900, 4, 4, sep=2.0, seed=7)
    d = MoGDispatcher(4, 4, covariance_type=cov, backend="eager").double()
    d.initialize(x, generator=torch.Generator().manual_seed(3))
    tol = 1e-4
    sk = GaussianMixture(4, covariance_type=cov, max_iter=200, tol=tol, **sk_init_from(d)).fit(x.numpy())
    d.fit(x, n_iter=200, tol=tol, init="given")
    assert d.converged_ and sk.converged_ and d.n_iter_ == sk.n_iter_ == len(d.lower_bounds_) > 3
    changes = np.abs(np.diff(d.lower_bounds_))
    assert changes[-1] < tol and (changes[:-1] >= tol).all()
    assert d.lower_bound_ == d.lower_bounds_[-1]
    np.testing.assert_allclose(d.lower_bound_, sk.lower_bound_, rtol=0, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_size_matches_full_batch(backend):
    backend_or_skip(backend)
    x, _ = blobs(1000, 5, 4, offset=1e3, sep=3.0, seed=11)
    fits = []
    for bs in (None, 97):
        d = MoGDispatcher(4, 5, backend=backend).double()
        d.fit(x, n_iter=20, tol=1e-8, generator=torch.Generator().manual_seed(5), batch_size=bs)
        fits.append(d)
    a, b = fits
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=0, atol=1e-11)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-9)


def test_default_backend_auto():
    """backend="auto" (the default): cpu kernel when the extension is loaded, else eager."""
    x, comp = blobs(600, 3, 3, seed=2)
    d = MoGDispatcher(3, 3).double()
    try:
        d.fit(x, generator=torch.Generator().manual_seed(0))
    except NotImplementedError as e:
        pytest.skip(f"auto picked a backend whose kernel is not implemented yet ({str(e).splitlines()[0][:120]})")
    assert d.converged_ and same_partition(d(x).numpy(), comp.numpy())


# ----------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_seeded_fit_is_deterministic(init):
    x, _ = blobs(800, 4, 5, sep=3.0, seed=3)
    runs = [MoGDispatcher(5, 4, backend="eager").double().fit(x, n_iter=5, tol=0.0, init=init,
                                                             generator=torch.Generator().manual_seed(42))
            for _ in range(2)]
    for pa, pb in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(pa, pb)
    other = MoGDispatcher(5, 4, backend="eager").double().initialize(x, init=init, generator=torch.Generator().manual_seed(43))
    first = MoGDispatcher(5, 4, backend="eager").double().initialize(x, init=init, generator=torch.Generator().manual_seed(42))
    assert not torch.equal(first.means, other.means)  # the generator does drive the init


def test_kmeanspp_init_recovers_separated_clusters():
    x, comp = blobs(1000, 3, 5, offset=1e3, seed=9)
    d = MoGDispatcher(5, 3, backend="eager").double().initialize(x, generator=torch.Generator().manual_seed(0))
    assert same_partition(d(x).numpy(), comp.numpy())
    # weights and variances come from the hard assignment
    counts = torch.bincount(comp, minlength=5).double()
    torch.testing.assert_close(d.weights.sort().values, (counts / counts.sum()).sort().values, rtol=1e-9, atol=1e-12)
    assert 0.2 < float(d.variances.min()) and float(d.variances.max()) < 2.5


def test_kmeans_helpers_match_sklearn_lloyd():
    """k-means++ picks distinct data rows; our Lloyd iterations from those seeds reach sklearn's Lloyd result."""
    from sklearn.cluster import KMeans

    from moekernels.nn.dispatcher import _kmeans_plusplus, _lloyd

    x, _ = blobs(700, 3, 6, sep=1.5, seed=12)
    xc = x - x.mean(0)
    seeds = _kmeans_plusplus(xc, 6, torch.Generator().manual_seed(0), torch.device("cpu"))
    rows = [int(torch.nonzero((xc == s).all(1))[0]) for s in seeds]
    assert len(set(rows)) == 6
    ours = _lloyd(xc, seeds, 300)
    km = KMeans(6, init=seeds.numpy(), n_init=1, algorithm="lloyd", tol=0.0, max_iter=300).fit(xc.numpy())
    assert (ours - seeds).abs().max() > 1e-3  # Lloyd moved the seeds
    np.testing.assert_allclose(ours.numpy(), km.cluster_centers_, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------- inference
def test_forward_responsibilities_log_prob_against_ref():
    K, D = 4, 3
    d = MoGDispatcher(K, D, backend="eager").double()
    with torch.no_grad():
        d.log_var.normal_(0, 0.3)
        d.log_pi.normal_()
    x = torch.randn(50, D, dtype=torch.float64) * 2
    lr, lse, assign = mog_posterior_ref(x, d.means.detach(), d.log_var.detach(), d.log_pi.detach())
    torch.testing.assert_close(d.responsibilities(x).detach(), lr.exp(), rtol=0, atol=1e-12)
    torch.testing.assert_close(d.log_prob(x).detach(), lse, rtol=0, atol=1e-12)
    assert torch.equal(d(x), assign) and d(x).dtype == torch.int64
    torch.testing.assert_close(d.score(x).detach(), lse.mean(), rtol=0, atol=1e-12)
    # gradients reach every parameter (mixDDPM trains the prior by gradient too)
    (-d.score(x)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())
    # float32 module, float64 data: computed in the promoted dtype
    d32 = MoGDispatcher(K, D, covariance_type="spherical", backend="eager")
    assert d32.log_prob(x).dtype == torch.float64 and d32(x.float()).shape == (50,)


def test_soft_draws_follow_responsibilities():
    d = MoGDispatcher(3, 2, hard=False, backend="eager").double()
    with torch.no_grad():
        d.means.copy_(torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.0, 2.0]]))
        d.log_var.zero_()
        d.log_pi.copy_(torch.tensor([0.0, 0.3, -0.2]))
    row = torch.tensor([[0.6, 0.7]], dtype=torch.float64)
    r = d.responsibilities(row)[0].detach()
    assert float(r.min()) > 0.1  # a genuinely ambiguous row
    n = 30000
    draws = d(row.expand(n, 2), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=3).double()
    _, p = chisquare(counts.numpy(), (r * n).numpy())
    assert p > 1e-3, (counts, r * n)
    # argmax would put every draw in one component: the test can tell the two apart
    assert int((counts > 0).sum()) == 3
    again = d(row.expand(n, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    d.hard = True
    assert torch.equal(d(row.expand(5, 2)), r.argmax().repeat(5))


def test_verbose_progress_bar(capsys):
    x, _ = blobs(300, 2, 2, seed=4)
    MoGDispatcher(2, 2, backend="eager").double().fit(x, verbose=True, generator=torch.Generator().manual_seed(0))
    assert "EM" in capsys.readouterr().err


def test_n_iter_zero_keeps_init_and_given_keeps_params():
    x, _ = blobs(300, 2, 3, seed=4)
    d = MoGDispatcher(3, 2, backend="eager").double().initialize(x, generator=torch.Generator().manual_seed(0))
    snap = [p.detach().clone() for p in d.parameters()]
    d.fit(x, n_iter=0, init="given")
    assert d.n_iter_ == 0 and d.lower_bound_ == -math.inf
    for p, q in zip(d.parameters(), snap):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs,name", [
    (dict(n_components=0, dim=2), "n_components"),
    (dict(n_components=2, dim=0), "dim"),
    (dict(n_components=2, dim=2, covariance_type="full"), "covariance_type"),
    (dict(n_components=2, dim=2, backend="gpu"), "backend"),
])
def test_bad_constructor_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MoGDispatcher(**kwargs)


@pytest.mark.parametrize("x,kwargs,name", [
    (torch.randn(10), {}, r"\bx\b.*shape"),
    (torch.randn(10, 3, 1), {}, r"\bx\b.*shape"),
    (torch.randn(10, 4), {}, r"\bx\b.*shape"),  # wrong D
    (torch.randint(0, 5, (10, 3)), {}, r"\bx\b.*dtype"),
    (torch.tensor([[0.0, 1.0, float("nan")]] * 10), {}, r"\bx\b.*NaN"),
    ([[0.0, 1.0, 2.0]] * 10, {}, r"\bx\b.*torch.Tensor"),
    (torch.randn(3, 3), {}, "n_components"),  # K = 4 > 3 points
    (torch.randn(10, 3), dict(init="kmeans"), "init"),
    (torch.randn(10, 3), dict(n_iter=-1), "n_iter"),
    (torch.randn(10, 3), dict(tol=-1.0), "tol"),
    (torch.randn(10, 3), dict(reg_covar=-1e-6), "reg_covar"),
    (torch.randn(10, 3), dict(batch_size=0), "batch_size"),
])
def test_bad_fit_inputs(x, kwargs, name):
    with pytest.raises(ValueError, match=name):
        MoGDispatcher(4, 3, backend="eager").fit(x, **kwargs)


def test_bad_forward_inputs():
    d = MoGDispatcher(2, 3, backend="eager")
    for bad in (torch.randn(5, 2), torch.randn(5), torch.zeros(5, 3, dtype=torch.int32)):
        for fn in (d, d.responsibilities, d.log_prob, d.score):
            with pytest.raises(ValueError, match=r"\bx\b"):
                fn(bad)


def test_degenerate_variance_names_reg_covar():
    x = torch.ones(20, 2, dtype=torch.float64)  # every point identical: a second component gets no data
    with pytest.raises(ValueError, match="reg_covar"):
        MoGDispatcher(2, 2, backend="eager").double().fit(x, reg_covar=0.0, generator=torch.Generator().manual_seed(0))
    # with the default regularisation it fits (variance = reg_covar)
    d = MoGDispatcher(2, 2, backend="eager").double().fit(x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(d.log_prob(x)).all()


def test_numpy_input_accepted():
    x, comp = blobs(400, 3, 2, seed=6)
    d = MoGDispatcher(2, 3, backend="eager").double().fit(x.numpy(), generator=torch.Generator().manual_seed(0))
    assert same_partition(d(x.numpy()).numpy(), comp.numpy())
