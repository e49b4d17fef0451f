"""moekernels.data.subspaces: the MoLR-MoG generator's true score (the fused op with the true parameters) against
an independent dense log-density."""
import pytest
import torch

from moekernels.data.subspaces import SubspaceMoG, random_orthonormal_bases


pytestmark = pytest.mark.usefixtures("one_thread")



def _noised(gen, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = gen.sample(n, generator=g)
    t = torch.linspace(0.03, 1.0, n, dtype=torch.float64)
    return gen.noised(x0, t, g), t


@pytest.mark.parametrize("D,K,L,d", [(7, 3, 2, 2), (5, 2, 3, 5), (9, 1, 1, 3)])
def test_true_score_is_gradient_of_log_density(D, K, L, d):
    gen = SubspaceMoG(D, K, L, d, seed=D + K, random_weights=True, mean_scale=1.5)
    xt, t = _noised(gen)
    score = gen.score(xt, t)
    h = 1e-5
    fd = torch.empty_like(xt)
    for i in range(D):
        e = torch.zeros_like(xt)
        e[:, i] = h
        fd[:, i] = (gen.log_prob(xt + e, t) - gen.log_prob(xt - e, t)) / (2 * h)
    assert torch.allclose(score, fd, rtol=1e-6, atol=1e-6 * score.abs().max().item())


def test_log_prob_matches_the_ops_lse_and_integrates_like_a_density():
    from moekernels.ops.molr_mog_score import molr_mog_score

    gen = SubspaceMoG(6, 2, 2, 2, seed=5)
    xt, t = _noised(gen, n=8)
    s, g = gen.schedule(t)
    p = gen.params()
    lse = molr_mog_score(xt, s, g, p["A"], p["mu"], p["log_var"], p["log_pi"], return_lse=True).lse
    assert torch.allclose(lse, gen.log_prob(xt, t), atol=1e-10)
    # 1-D: the density at a fixed time integrates to 1 (trapezoid on a wide grid)
    g1 = SubspaceMoG(1, 2, 2, 1, seed=3)
    grid = torch.linspace(-12, 12, 20001, dtype=torch.float64)[:, None]
    dens = g1.log_prob(grid, s=0.8, gamma=0.3).exp()
    assert abs(torch.trapezoid(dens, grid[:, 0]).item() - 1.0) < 1e-6


def test_samples_lie_in_their_subspaces_and_parameters_are_valid():
    gen = SubspaceMoG(20, 3, 2, 4, seed=0)
    x0, k = gen.sample(300, seed=2, return_labels=True)
    A = gen.A[k]  # (n, D, d)
    resid = x0 - torch.einsum("nDd,nd->nD", A, torch.einsum("nDd,nD->nd", A, x0))
    assert resid.abs().max() < 1e-12
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(gen.A.transpose(1, 2) @ gen.A, eye.expand(3, 4, 4), atol=1e-12)
    assert torch.isclose(gen.pi.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert gen.intrinsic_size == 3 * 2 * 4
    assert torch.equal(gen.sample(10, seed=4), gen.sample(10, seed=4))
    assert set(k.tolist()) == {0, 1, 2}
    B = random_orthonormal_bases(2, 5, 3, torch.Generator().manual_seed(0))
    assert B.shape == (2, 5, 3)


@pytest.mark.parametrize("kwargs,word", [({"dim": 0}, "dim"), ({"n_experts": 0}, "n_experts"),
                                         ({"latent_dim": 9}, "latent_dim"), ({"var_range": (0.0, 1.0)}, "var_range"),
                                         ({"mean_scale": -1.0}, "mean_scale"), ({"mean_scale": "1"}, "mean_scale"),
                                         ({"var_range": 0.1}, "var_range")])
def test_bad_arguments_are_named(kwargs, word):
    args = {"dim": 8, "n_experts": 2, "n_components": 2, "latent_dim": 3} | kwargs
    with pytest.raises(ValueError, match=word):
        SubspaceMoG(**args)


def test_bad_call_arguments_are_named():
    gen = SubspaceMoG(4, 2, 2, 2)
    with pytest.raises(ValueError, match="n must"):
        gen.sample(0)
    with pytest.raises(ValueError, match="gamma"):
        gen.log_prob(torch.zeros(2, 4, dtype=torch.float64), s=1.0, gamma=0.0)
    with pytest.raises(ValueError, match="s must be a number or have one value per row"):
        gen.log_prob(torch.zeros(2, 4, dtype=torch.float64), s=torch.ones(3), gamma=0.5)
    with pytest.raises(ValueError, match="either t or"):
        gen.score(torch.zeros(2, 4, dtype=torch.float64), 0.5, s=1.0, gamma=0.5)
