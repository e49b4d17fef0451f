"""mixDDPM / mixSGM: recentred forward marginals, samplers against exact answers, training, CLI, bad input."""
import json

import numpy as np
import pytest
import torch

from moekernels.diffusion.ddpm import DDPMScheduler
from moekernels.diffusion.schedules import DiscreteSchedule, Schedule, VESchedule, VPSchedule
from moekernels.diffusion.sde import probability_flow_sample, reverse_sde_sample, sde_coefficients
from moekernels.methods.mixdiffusion import EpsMLP, ExactGMMEps, MixDDPM, MixSGM, RunConfig, build_model, main
from moekernels.metrics.wasserstein import wasserstein_1d
from moekernels.nn import MixturePrior

pytestmark = pytest.mark.usefixtures("one_thread")

CENTRES = torch.tensor([[-4.0, 1.0], [3.0, 2.0], [0.5, -5.0]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])


def given_prior(centres=CENTRES, weights=WEIGHTS):
    p = MixturePrior(len(centres), centres.shape[1])
    with torch.no_grad():
        p.dispatcher.means.copy_(centres)
        p.dispatcher.log_pi.copy_(weights.log())
    p.fitted = True
    return p


class ZeroEps(EpsMLP):
    def forward(self, x, t, k=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("kind", ["ddpm", "sgm"])
def test_recentred_forward_marginals(kind):
    prior = given_prior()
    net = EpsMLP(2, hidden=8, n_residual=0, time_emb=4)
    n = 40000
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64).expand(n, 2)
    k = torch.full((n,), 2, dtype=torch.long)
    noise = torch.randn(n, 2, dtype=torch.float64)
    c = CENTRES[2].double()
    if kind == "ddpm":
        sched = DDPMScheduler(200, 1e-4, 0.1)
        model = MixDDPM(net, prior, sched)
        cases = [(t, float(sched.alphas_cumprod[t])) for t in (0, 60, 199)]
        make_t = lambda t: torch.full((n,), t)  # noqa: E731
    else:
        sched = VPSchedule(0.1, 20.0)
        model = MixSGM(net, prior, sched)
        cases = [(t, float(sched.alpha_bar(t))) for t in (0.01, 0.3, 1.0)]
        make_t = lambda t: torch.full((n,), t, dtype=torch.float64)  # noqa: E731
    for t, ab in cases:
        xt = model.q_sample(x0, noise, make_t(t), k)
        # x_t = sqrt(abar) x0 + (1 - sqrt(abar)) c_k + sqrt(1 - abar) eps
        mean = ab ** 0.5 * x0[0] + (1 - ab ** 0.5) * c
        np.testing.assert_allclose(xt.mean(0).numpy(), mean.numpy(), atol=4 * (1 - ab) ** 0.5 / n ** 0.5 + 1e-12)
        np.testing.assert_allclose(xt.var(0).numpy(), [1 - ab] * 2, rtol=0.03, atol=1e-12)
    # at the end of the forward process the marginal is N(c_k, I)
    np.testing.assert_allclose(xt.mean(0).numpy(), c.numpy(), atol=0.05)
    np.testing.assert_allclose(xt.var(0).numpy(), [1.0, 1.0], rtol=0.03)


def test_zero_model_ddpm_sample_has_the_prior_statistics():
    sched = DDPMScheduler(50, 1e-4, 0.3)
    model = MixDDPM(ZeroEps(2), given_prior(), sched)
    x, xT, k = model.sample(20000, generator=torch.Generator().manual_seed(0), return_start=True)
    np.testing.assert_allclose((torch.bincount(k, minlength=3) / len(k)).numpy(), WEIGHTS.numpy(), atol=0.015)
    # eps = 0: y -> a_t y + sigma_t z per step with a_t = coef1 / sqrt(abar_t) + coef2, so E[x | k] = c_k and
    # Var = prod a_t^2 + sum_t sigma_t^2 prod_{s < t} a_s^2, from the scheduler's tables
    ab = sched.alphas_cumprod
    v = 1.0
    for t in range(49, -1, -1):
        ab_prev = ab[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - ab[t] / ab_prev
        a = beta * ab_prev.sqrt() / (1 - ab[t]) / ab[t].sqrt() + (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab[t])
        v = a ** 2 * v + float(sched.get_variance(t))
    for j in range(3):
        xj, sj = x[k == j], xT[k == j]
        np.testing.assert_allclose(sj.mean(0).numpy(), CENTRES[j].numpy(), atol=0.06)
        np.testing.assert_allclose(sj.var(0).numpy(), [1.0, 1.0], rtol=0.08)
        np.testing.assert_allclose(xj.mean(0).numpy(), CENTRES[j].numpy(), atol=0.06 * float(v) ** 0.5)
        np.testing.assert_allclose(xj.var(0).numpy(), [float(v)] * 2, rtol=0.08)


@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_zero_model_sgm_sample_keeps_the_component_means(sampler):
    model = MixSGM(ZeroEps(2), given_prior(), VPSchedule(0.1, 20.0))
    x, xT, k = model.sample(6000, generator=torch.Generator().manual_seed(1), n_steps=50, sampler=sampler,
                            return_start=True)
    np.testing.assert_allclose((torch.bincount(k, minlength=3) / len(k)).numpy(), WEIGHTS.numpy(), atol=0.025)
    for j in range(3):
        spread = float((x[k == j] - CENTRES[j]).std())
        np.testing.assert_allclose(x[k == j].mean(0).numpy(), CENTRES[j].numpy(), atol=0.1 * spread)
    if sampler == "ode":  # deterministic and linear in x_T - c_k: x - c_k = a (x_T - c_k) with one scalar a
        d = xT - CENTRES[k]
        a = ((x - CENTRES[k]) / d)[d.abs() > 0.1]
        np.testing.assert_allclose(a.numpy(), float(a[0]), rtol=1e-3)


@pytest.mark.parametrize("kind", ["ddpm", "sde", "ode"])
def test_exact_eps_recovers_the_data(kind):
    mu = torch.tensor([[-6.0], [0.0], [6.0]])
    sd = torch.tensor([0.5, 0.3, 0.7])
    w = torch.tensor([0.6, 0.3, 0.1])
    centres = mu + torch.tensor([[0.4], [-0.3], [0.2]])  # centres need not be the cluster means
    prior = given_prior(centres, w)
    g = torch.Generator().manual_seed(3)
    if kind == "ddpm":
        sched = DDPMScheduler(1000, 1e-4, 0.02)  # the standard DDPM schedule: fixed-small variance is accurate
        ab = sched.alphas_cumprod
        net = ExactGMMEps(mu, sd, w, prior, lambda t: (ab[t].sqrt(), (1 - ab[t]).sqrt()))
        x, _, k = MixDDPM(net, prior, sched, condition_on_k=True).sample(4000, generator=g, return_start=True)
    else:
        sched = VPSchedule(0.1, 20.0)
        net = ExactGMMEps(mu, sd, w, prior, lambda t: (sched.s(t.double()), sched.gamma(t.double())))
        x, _, k = MixSGM(net, prior, sched, condition_on_k=True, time_scale=1.0).sample(
            4000, generator=g, n_steps=200, sampler=kind, return_start=True)
    ref = torch.randn(20000, 1, generator=torch.Generator().manual_seed(5))
    for j in range(3):  # each component's samples are N(mu_j, sd_j^2)
        xj = x[k == j]
        assert float(xj.mean()) == pytest.approx(float(mu[j]), abs=4 * float(sd[j]) / len(xj) ** 0.5 + 0.01)
        assert float(xj.std()) == pytest.approx(float(sd[j]), rel=0.06)
        assert wasserstein_1d(xj, mu[j] + sd[j] * ref) < 0.05 * float(sd[j]) + 4 * float(sd[j]) / len(xj) ** 0.5


def test_training_loss_decreases():
    cfg = RunConfig(dataset="sep1d", method="mixddpm+k", hidden=64, n_residual=1, time_emb=16, n_data=2000)
    from moekernels.data.gmm import get_gmm
    from moekernels.diffusion.training import TrainConfig, train

    x = get_gmm("sep1d", 2000, seed=0)[0]
    for method in ("mixddpm+k", "mixsgm+k"):
        model = build_model(RunConfig(**{**cfg.__dict__, "method": method}), x)
        res = train(model, x, MixDDPM.loss_fn, TrainConfig(steps=150, batch_size=128, lr=3e-3, progress=False,
                                                           checkpoint_every=0))
        loss = np.asarray(res.history["loss"])
        assert loss[-30:].mean() < 0.7 * loss[:10].mean(), method
        assert float(model.prior.effort_reduction()) == pytest.approx(45.0, rel=0.05)  # (81 + 9 + 9 + 81) / 4


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "runs"
    args = ["--datasets", "sep1d", "--methods", "ddpm", "mixddpm+k", "--seeds", "0", "--budgets", "1",
            "--full-steps", "20", "--n-samples", "200", "--out", str(out), "--results", str(tmp_path / "R.md"),
            "--no-progress", "--no-plots", "--recipe", str(tmp_path / "none.toml")]
    assert main(args) == 0
    m = json.loads((out / "sep1d" / "mixddpm+k" / "b1" / "seed0" / "metrics.json").read_text())
    assert m["steps"] == 20 and m["prior_K"] == 4 and "w1" in m and "floor_w1" in m and "mode_tv" in m
    text = (tmp_path / "R.md").read_text()
    assert "mixddpm+k" in text and "BEGIN GENERATED" in text and "`moekernels reproduce mixdiffusion" in text
    mtime = (out / "sep1d" / "ddpm" / "b1" / "seed0" / "metrics.json").stat().st_mtime
    assert main(args) == 0  # finished runs are reused
    assert (out / "sep1d" / "ddpm" / "b1" / "seed0" / "metrics.json").stat().st_mtime == mtime


def test_bad_arguments_name_the_argument():
    prior = given_prior()
    with pytest.raises(ValueError, match="hidden"):
        EpsMLP(2, hidden=0)
    with pytest.raises(ValueError, match="net.dim"):
        MixDDPM(EpsMLP(3), prior, DDPMScheduler())
    with pytest.raises(ValueError, match="prior is not fitted"):
        MixDDPM(EpsMLP(2), MixturePrior(3, 2), DDPMScheduler())
    with pytest.raises(ValueError, match="condition_on_k"):
        MixSGM(EpsMLP(2), prior, condition_on_k=True)
    with pytest.raises(ValueError, match="scheduler"):
        MixDDPM(EpsMLP(2), prior, VPSchedule())
    with pytest.raises(ValueError, match="sampler"):
        MixSGM(EpsMLP(2), prior).sample(4, sampler="heun")
    with pytest.raises(ValueError, match="time_scale"):
        MixSGM(EpsMLP(2), prior, time_scale=0.0)
    oracle = ExactGMMEps(CENTRES[:2], torch.ones(2), torch.ones(2) / 2, prior,
                         lambda t: (torch.ones(()), torch.ones(())))  # data components at c_0 and c_1 only
    assert torch.isfinite(oracle(torch.zeros(3, 2), torch.zeros(3), torch.tensor([0, 1, 1]))).all()
    with pytest.raises(ValueError, match=r"prior component\(s\) \[2\]"):
        oracle(torch.zeros(3, 2), torch.zeros(3), torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="pass k"):
        EpsMLP(2, n_components=3)(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="method"):
        build_model(RunConfig(method="ddim"), torch.zeros(10, 2))
    with pytest.raises(SystemExit, match="--budgets"):
        main(["--budgets", "2", "--no-plots"])
    with pytest.raises(SystemExit, match="--n-samples"):
        main(["--n-samples", "0", "--no-plots"])


class _VPByHand(Schedule):
    """VP (beta 0.1..20) written out, not a VPSchedule: ``sde_coefficients`` takes its finite-difference path."""

    def s(self, t):
        return float(np.exp(-0.5 * (0.1 * t + 9.95 * t * t)))

    def gamma(self, t):
        return float(np.sqrt(-np.expm1(-(0.1 * t + 9.95 * t * t))))


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_sde_coefficients(t):
    # VP: f = -beta / 2, g^2 = beta with beta(t) = 0.1 + 19.9 t; VE: f = 0, g^2 = d sigma^2 / dt = 2 log(r) sigma^2
    beta = 0.1 + 19.9 * t
    assert sde_coefficients(VPSchedule(0.1, 20.0), t) == pytest.approx((-beta / 2, beta), rel=1e-12)
    f, g2 = sde_coefficients(_VPByHand(), t)
    assert f == pytest.approx(-beta / 2, rel=1e-5) and g2 == pytest.approx(beta, rel=1e-5)
    ve = VESchedule(0.01, 50.0)
    f, g2 = sde_coefficients(ve, t)
    assert abs(f) < 1e-9 and g2 == pytest.approx(2 * np.log(5000.0) * ve.gamma(t) ** 2, rel=1e-6)
    with pytest.raises(ValueError, match="t must"):
        sde_coefficients(ve, t + 1.5)


def test_sde_samplers_bad_arguments_name_the_argument():
    def model(x, t):
        return torch.zeros_like(x)

    x = torch.zeros(4, 2)
    for fn in (reverse_sde_sample, probability_flow_sample):
        with pytest.raises(ValueError, match="n_steps"):
            fn(model, VPSchedule(), x, n_steps=0)
        with pytest.raises(ValueError, match="t_min"):
            fn(model, VPSchedule(), x, t_min=1.0)
        with pytest.raises(ValueError, match="prediction"):
            fn(model, VPSchedule(), x, prediction="v")
        with pytest.raises(ValueError, match="center"):
            fn(model, VPSchedule(), x, center=torch.zeros(3, 4, 2))
        with pytest.raises(ValueError, match="continuous-time"):
            fn(model, DiscreteSchedule(DDPMScheduler(10).alphas_cumprod), x)
        with pytest.raises(ValueError, match="x_T"):
            fn(model, VPSchedule(), torch.zeros(4, 2, dtype=torch.long))
