"""moekernels.nn.MoLRMoGScore and moekernels.diffusion.schedules."""
import math

import pytest
import torch

from moekernels.diffusion.schedules import VESchedule, VPSchedule
from moekernels.nn import MoLRMoGScore
from moekernels.ops import dispatch
from moekernels.ops.molr_mog_score import SPEC, molr_mog_score_ref

F64 = torch.float64


# ------------------------------------------------------------------------------------------- schedules
def test_vp_schedule_closed_form_and_variance_preserving():
    sch = VPSchedule(beta_min=0.1, beta_max=20.0)
    t = torch.linspace(0, 1, 101, dtype=F64)
    integral = 0.1 * t + 0.5 * 19.9 * t * t
    torch.testing.assert_close(sch.alpha_bar(t), torch.exp(-integral), rtol=1e-14, atol=0)
    torch.testing.assert_close(sch.s(t), torch.exp(-integral).sqrt(), rtol=1e-14, atol=0)
    torch.testing.assert_close(sch.s(t) ** 2 + sch.gamma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-14)
    torch.testing.assert_close(sch.beta(t), 0.1 + 19.9 * t, rtol=1e-14, atol=0)
    assert (sch.gamma(t).diff() > 0).all() and (sch.s(t).diff() < 0).all()
    assert sch.gamma(0.0) == 0.0 and sch.s(0.0) == 1.0


def test_vp_schedule_tiny_gamma_keeps_relative_precision():
    """gamma = sqrt(1 - alpha_bar) with expm1: at t = 1e-7, gamma ~ 1e-4 to full relative precision, in float32
    too (sqrt(1 - exp(-1e-8)) in float32 would be 0)."""
    sch = VPSchedule()
    t = 1e-7
    exact = math.sqrt(-math.expm1(-(0.1 * t + 0.5 * 19.9 * t * t)))
    assert abs(sch.gamma(t) - exact) <= 1e-15 * exact
    g32 = sch.gamma(torch.tensor([t], dtype=torch.float32))
    assert g32.dtype == torch.float32 and abs(g32.item() - exact) <= 1e-7 * exact


def test_ve_schedule():
    sch = VESchedule(sigma_min=0.01, sigma_max=50.0)
    t = torch.tensor([0.0, 0.5, 1.0])
    s, g = sch(t)
    assert torch.equal(s, torch.ones(3)) and s.dtype == torch.float32
    torch.testing.assert_close(g, torch.tensor([0.01, math.sqrt(0.01 * 50.0), 50.0]), rtol=1e-6, atol=0)
    assert sch.s(0.3) == 1.0 and isinstance(sch.gamma(0.3), float)


def test_schedule_add_noise_and_errors():
    sch = VPSchedule()
    x0, eps = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    t = torch.rand(4, dtype=F64)
    torch.testing.assert_close(sch.add_noise(x0, eps, t), sch.s(t)[:, None] * x0 + sch.gamma(t)[:, None] * eps)
    torch.testing.assert_close(sch.add_noise(x0, eps, 0.5), sch.s(0.5) * x0 + sch.gamma(0.5) * eps)
    with pytest.raises(ValueError):
        VPSchedule(beta_min=2.0, beta_max=1.0)
    with pytest.raises(ValueError):
        VESchedule(sigma_min=0.0)


# ------------------------------------------------------------------------------------------- the module
def full_cov_log_prob(x, s, gamma, A, mu, log_var, log_pi):
    """Independent float64 log-density from torch.distributions (scalar s, gamma)."""
    K, L, d = mu.shape
    D = x.shape[1]
    Ak = torch.eye(D, dtype=F64).expand(K, D, D) if A is None else A
    mean = s * torch.einsum("kDd,kld->klD", Ak, mu)
    cov = s * s * torch.einsum("kDd,kld,kEd->klDE", Ak, log_var.exp(), Ak) + gamma ** 2 * torch.eye(D, dtype=F64)
    l = torch.distributions.MultivariateNormal(mean, cov).log_prob(x[:, None, None, :])
    l = l + torch.log_softmax(log_pi.reshape(-1), 0).view(K, L)
    return torch.logsumexp(l.reshape(x.shape[0], -1), -1)


def make_module(basis="learned", dtype=F64, **kw):
    torch.manual_seed(0)
    D, d = (6, 6) if basis == "identity" else (9, 3)
    m = MoLRMoGScore(D, 3, 2, d, basis=basis, dtype=dtype, **kw)
    with torch.no_grad():
        m.log_var.normal_(0, 0.4)
        m.log_pi.normal_()
    return m


@pytest.mark.parametrize("basis", ["learned", "identity"])
def test_sizes_repr_and_parameter_count(basis):
    m = make_module(basis)
    assert m.num_parameters() == sum(p.numel() for p in m.parameters())
    K, L, D, d = 3, 2, m.dim, m.latent_dim
    assert m.num_parameters() == (K * D * d if basis == "learned" else 0) + 2 * K * L * d + K * L
    r = repr(m)
    for piece in (f"dim={D}", "n_experts=3", "n_components=2", f"latent_dim={d}", f"basis='{basis}'", "VPSchedule"):
        assert piece in r
    big = MoLRMoGScore(784, 10, 4, 16)
    assert big.num_parameters() == 10 * 784 * 16 + 2 * 10 * 4 * 16 + 40 == sum(p.numel() for p in big.parameters())


def test_constructor_errors():
    with pytest.raises(ValueError, match="latent_dim"):
        MoLRMoGScore(4, 2, 2, 5)
    with pytest.raises(ValueError, match="identity"):
        MoLRMoGScore(8, 2, 2, 4, basis="identity")
    with pytest.raises(ValueError, match="basis"):
        MoLRMoGScore(8, 2, 2, 4, basis="random")
    with pytest.raises(ValueError):
        MoLRMoGScore(8, 0, 2, 4)


def test_basis_stays_orthonormal_through_training():
    m = make_module()
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    x = torch.randn(32, 9, dtype=F64)
    for _ in range(5):
        opt.zero_grad()
        loss = m(x, torch.rand(32, dtype=F64) * 0.9 + 0.05).square().mean()
        loss.backward()
        opt.step()
        A = m.basis()
        torch.testing.assert_close(A.transpose(1, 2) @ A, torch.eye(3, dtype=F64).expand(3, 3, 3), rtol=0, atol=1e-12)
    assert m.basis_weight.grad is not None and m.basis_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("basis", ["learned", "identity"])
@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule(0.05, 5.0)], ids=["vp", "ve"])
def test_forward_is_the_op_at_the_schedule_times(basis, schedule):
    m = make_module(basis, schedule=schedule)
    x = torch.randn(11, m.dim, dtype=F64)
    t = torch.rand(11, dtype=F64) * 0.9 + 0.05
    s, g = schedule(t)
    score, w, lse = molr_mog_score_ref(x, s, g, m.basis(), m.mu, m.log_var, m.log_pi)
    torch.testing.assert_close(m(x, t), score, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x, t[:, None]), score, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.posterior(x, t), w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.log_prob(x, t), lse, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.predict_eps(x, t), -g[:, None] * score, rtol=1e-10, atol=1e-10)
    # a single time for the batch
    s0, g0 = schedule(0.3)
    torch.testing.assert_close(m(x, 0.3), molr_mog_score_ref(x, s0, g0, m.basis(), m.mu, m.log_var, m.log_pi)[0],
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.predict_eps(x, 0.3), -g0 * m(x, 0.3))


@pytest.mark.parametrize("basis", ["learned", "identity"])
def test_log_prob_is_the_noised_density(basis):
    """log_prob equals the log-density of the noised model from full-covariance Gaussians; forward is its gradient."""
    m = make_module(basis)
    sch = m.schedule
    x = m.sample_x0(13, generator=torch.Generator().manual_seed(1))
    x = sch.add_noise(x, torch.randn_like(x), 0.2)
    s, g = sch(0.2)
    exp = full_cov_log_prob(x, s, g, m.basis().detach() if basis == "learned" else None, m.mu.detach(),
                            m.log_var.detach(), m.log_pi.detach())
    torch.testing.assert_close(m.log_prob(x, 0.2), exp, rtol=0, atol=1e-10)
    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(m.log_prob(xr, 0.2).sum(), xr)
    torch.testing.assert_close(m(x, 0.2), grad, rtol=1e-9, atol=1e-9)


def test_gradients_reach_every_parameter_and_backends_agree():
    m = make_module(dtype=torch.float32)
    x = torch.randn(40, 9)
    t = torch.rand(40) * 0.8 + 0.1
    grads = {}
    for backend in ("eager", "cpu"):
        if dispatch.not_supported_reasons(SPEC, backend, {"x": x}):
            continue
        m.backend = backend
        m.zero_grad()
        out = m(x, t)
        (out.square().mean() + m.log_prob(x, t).mean()).backward()
        grads[backend] = (out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
        for n, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (backend, n)
    if len(grads) == 2:
        (o1, g1), (o2, g2) = grads.values()
        torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-3)
        for n in g1:
            torch.testing.assert_close(g1[n], g2[n], rtol=1e-3, atol=1e-3 * max(1.0, g1[n].abs().max().item()))


def test_denoising_score_matching_learns_a_subspace():
    """A short DSM fit on data from a planted 1-expert model moves the learned basis onto the planted subspace."""
    torch.manual_seed(0)
    teacher = MoLRMoGScore(6, 1, 2, 2, dtype=F64)
    with torch.no_grad():
        teacher.mu.mul_(2.0)
    data = teacher.sample_x0(2000, generator=torch.Generator().manual_seed(0))
    student = MoLRMoGScore(6, 1, 2, 2, dtype=F64)
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    sch = student.schedule
    P_t = teacher.basis()[0] @ teacher.basis()[0].T

    def overlap():
        A = student.basis()[0].detach()
        return torch.trace(P_t @ A @ A.T).item() / 2  # 1 = same subspace

    start = overlap()
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        x0 = data[torch.randint(0, 2000, (256,), generator=g)]
        t = torch.rand(256, generator=g, dtype=F64) * 0.7 + 0.05
        eps = torch.randn(x0.shape, generator=g, dtype=F64)
        loss = (student.predict_eps(sch.add_noise(x0, eps, t), t) - eps).square().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert overlap() > max(0.95, start + 0.1), (start, overlap())
