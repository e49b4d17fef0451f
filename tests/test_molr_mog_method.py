"""moekernels.methods.molr_mog: DSM training against the exact score, subspace matching, sampling, baselines."""
import math

import pytest
import torch

from moekernels.data.subspaces import SubspaceMoG, random_orthonormal_bases
from moekernels.diffusion.schedules import VPSchedule
from moekernels.methods import molr_mog as mm
from moekernels.nn.molr import MoLRMoGScore


pytestmark = pytest.mark.usefixtures("one_thread")


def _exact_model(gen):
    """MoLRMoGScore carrying the generator's true parameters (float64)."""
    m = MoLRMoGScore(gen.dim, gen.n_experts, gen.n_components, gen.latent_dim, gen.schedule, dtype=torch.float64)
    with torch.no_grad():
        m.basis_weight.copy_(gen.A)
        m.mu.copy_(gen.mu)
        m.log_var.copy_(gen.log_var)
        m.log_pi.copy_(gen.log_pi)
    return m


def test_score_errors_zero_for_the_true_parameters():
    gen = SubspaceMoG(12, 2, 2, 3, seed=1)
    err = mm.score_errors(_exact_model(gen), gen, n_eval=64, n_t=4, dtype=torch.float64)
    assert err["rel_l2_mean"] < 1e-10 and err["eps_mse_mean"] < 1e-18
    assert len(err["rel_l2"]) == 4 and err["t"][0] == pytest.approx(1e-2) and err["t"][-1] == pytest.approx(1.0)


class _Scaled(torch.nn.Module):
    """c times the true score: the relative L2 error is |c - 1| at every t, the excess eps-MSE (c - 1)^2 E||g s*||^2."""

    def __init__(self, gen, c):
        super().__init__()
        self.gen, self.c = gen, c

    def forward(self, x, t):
        return self.c * self.gen.score(x, t)


def test_score_errors_of_a_known_wrong_score():
    gen = SubspaceMoG(12, 2, 2, 3, seed=1)
    half = mm.score_errors(_Scaled(gen, 1.5), gen, n_eval=64, n_t=4, dtype=torch.float64)
    zero = mm.score_errors(_Scaled(gen, 0.0), gen, n_eval=64, n_t=4, dtype=torch.float64)
    for r in half["rel_l2"]:
        assert r == pytest.approx(0.5, rel=1e-12)
    assert zero["rel_l2_mean"] == pytest.approx(1.0, rel=1e-12)
    # same draws (same seed): the zero model's excess eps-MSE is gamma^2 E||s*||^2, 4x that of the 1.5x model
    for a, b in zip(zero["eps_mse"], half["eps_mse"]):
        assert a == pytest.approx(4 * b, rel=1e-12) and a > 0


@pytest.mark.parametrize("model", ["molr", "mlp_sim"])
def test_short_training_reduces_the_score_error(model):
    cfg = mm.SynthConfig(model=model, dim=16, n_train=256, n_experts=2, n_components=2, latent_dim=2, steps=300,
                         batch_size=64, n_eval=200, n_t_eval=4, seed=0)
    m = mm.run_synthetic(cfg)  # error before and after training on the same test draws and t grid
    assert m["rel_l2_mean"] < 0.8 * m["rel_l2_init"], (m["rel_l2_init"], m["rel_l2_mean"])
    assert m["n_params"] > 0 and m["train_time_s"] > 0
    if model.startswith("molr"):
        assert len(m["subspace"]["max_angle_deg"]) == 2


def test_principal_angles_identical_rotated_and_matching():
    A = random_orthonormal_bases(1, 10, 3, torch.Generator().manual_seed(0))[0]
    assert mm.principal_angles(A, A).max() < 1e-6
    assert mm.principal_angles(A, A @ torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]).max() < 1e-6
    # rotate the first column by theta towards a direction orthogonal to span(A)
    u = torch.randn(10, dtype=torch.float64)
    u = u - A @ (A.T @ u)
    u = u / u.norm()
    theta = 0.3
    B = A.clone()
    B[:, 0] = math.cos(theta) * A[:, 0] + math.sin(theta) * u
    ang = mm.principal_angles(A, B)
    assert ang.max() == pytest.approx(theta, abs=1e-9) and ang[:2].max() < 1e-6
    # Hungarian matching recovers a permutation of the true bases
    true = random_orthonormal_bases(4, 20, 3, torch.Generator().manual_seed(1))
    perm = torch.tensor([2, 0, 3, 1])
    res = mm.match_subspaces(true, true[perm])
    assert [int(perm[j]) for j in res["perm"]] == [0, 1, 2, 3]
    assert res["max_angle_deg_max"] < 1e-4
    other = random_orthonormal_bases(4, 20, 3, torch.Generator().manual_seed(2))
    assert mm.match_subspaces(true, other)["max_angle_deg_mean"] > 30


def test_ksubspaces_recovers_noiseless_subspaces():
    gen = SubspaceMoG(30, 3, 2, 3, seed=4)
    x = gen.sample(300, seed=5)
    A = mm.ksubspaces(x, 3, 3, generator=torch.Generator().manual_seed(0))
    assert mm.match_subspaces(gen.A, A)["max_angle_deg_max"] < 1e-3


def test_sampling_is_deterministic_under_a_seed_and_lands_on_the_subspaces():
    gen = SubspaceMoG(8, 2, 2, 2, seed=3, var_range=(0.02, 0.05))
    model = _exact_model(gen)
    for method in ("sde", "ode"):
        a = mm.sample(model, 64, 8, n_steps=60, seed=7, method=method, dtype=torch.float64)
        b = mm.sample(model, 64, 8, n_steps=60, seed=7, method=method, dtype=torch.float64)
        c = mm.sample(model, 64, 8, n_steps=60, seed=8, method=method, dtype=torch.float64)
        assert torch.equal(a, b) and not torch.equal(a, c)
        # exact score: the samples end close to the union of the two planes (data norm ~ 1.4)
        res = torch.stack([(a - a @ gen.A[k] @ gen.A[k].T).norm(dim=1) for k in range(2)], 1).min(1).values
        assert res.median() < 0.1, res.median()


def test_mlp_score_and_parameter_matching():
    for target, D in ((1132, 64), (16492, 1024)):
        h = mm.mlp_hidden_for(target, D)
        m = mm.MLPScore(D, h)
        assert abs(mm.count_parameters(m) - target) <= (D + 16) + 2 * h + D + 1
    x, t = torch.randn(4, 5), torch.rand(4) * 0.9 + 0.05
    g = VPSchedule().gamma(t)[:, None]
    for param in ("eps", "x0"):
        assert mm.MLPScore(5, 8, param=param)(x, 0.5).shape == (4, 5)
    with torch.no_grad():  # zero output layer: score = -x (eps: the N(0, I) score) / -x / gamma^2 (x0)
        for param, want, want_eps in (("eps", -x, g * x), ("x0", -x / g ** 2, x / g)):
            m = mm.MLPScore(5, 8, param=param)
            m.net[-1].weight.zero_()
            m.net[-1].bias.zero_()
            assert torch.allclose(m(x, t), want, rtol=1e-5)
            assert torch.allclose(m.predict_eps(x, t), want_eps, rtol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="t_min"):
        mm.dsm_loss_fn(VPSchedule(), t_min=0.0)
    with pytest.raises(ValueError, match="method"):
        mm.sample(mm.MLPScore(3, 4), 4, 3, method="heun")
    with pytest.raises(ValueError, match="n must"):
        mm.sample(mm.MLPScore(3, 4), 0, 3)
    with pytest.raises(ValueError, match="model"):
        mm.run_synthetic(mm.SynthConfig(model="unet", dim=8, n_train=32, n_experts=2, n_components=1,
                                        latent_dim=2, steps=1))
    with pytest.raises(ValueError, match="basis_init"):
        mm.run_synthetic(mm.SynthConfig(dim=8, n_train=32, n_experts=2, n_components=1, latent_dim=2, steps=1,
                                        basis_init="pca"))
    with pytest.raises(ValueError, match="same D"):
        mm.principal_angles(torch.zeros(4, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="match_subspaces"):
        mm.match_subspaces(torch.zeros(2, 4, 2), torch.zeros(3, 4, 2))
    with pytest.raises(ValueError, match="hidden"):
        mm.MLPScore(4, 0)
    with pytest.raises(ValueError, match="param"):
        mm.MLPScore(4, 3, param="v")
    with pytest.raises(ValueError, match="n_t"):
        mm.score_errors(mm.MLPScore(4, 3), SubspaceMoG(4, 1, 1, 2), n_t=0)
    with pytest.raises(ValueError, match="n_eval"):
        mm.score_errors(mm.MLPScore(4, 3), SubspaceMoG(4, 1, 1, 2), n_eval=0)
    with pytest.raises(ValueError, match="dim must"):
        mm.sample(mm.MLPScore(3, 4), 4, 0)
    with pytest.raises(ValueError, match="nonzero row"):
        mm.ksubspaces(torch.zeros(10, 4), 2, 2)
    with pytest.raises(ValueError, match="n_trials"):
        mm.ksubspaces(torch.randn(10, 4), 2, 2, n_trials=0)
    with pytest.raises(SystemExit):
        mm.main(["--parts", "nothing"])
