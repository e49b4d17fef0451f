"""DDPMScheduler: marginals of add_noise, the ancestral step against independent formulas, reproducibility,
no noise at t = 0, exact recovery of a point mass, strided timesteps."""
import math

import pytest
import torch

from moekernels.diffusion.ddpm import DDPMScheduler
from moekernels.diffusion.embeddings import SinusoidalEmbedding, sinusoidal_embedding


def _tables(T=100, b0=1e-4, b1=0.02):
    betas = torch.linspace(b0, b1, T, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return betas, ab, ab_prev


def test_tables():
    s = DDPMScheduler(100, 1e-4, 0.02)
    betas, ab, _ = _tables()
    assert torch.allclose(s.betas, betas) and torch.allclose(s.alphas_cumprod, ab)
    assert s.timesteps.tolist() == list(range(99, -1, -1)) and len(s) == 100


@pytest.mark.parametrize("t", [0, 37, 99])
def test_add_noise_marginals(t):
    s = DDPMScheduler(100)
    n = 200_000
    x0 = torch.tensor([1.5, -2.0], dtype=torch.float64).expand(n, 2)
    noise = torch.randn(n, 2, dtype=torch.float64)
    xt = s.add_noise(x0, noise, torch.full((n,), t))
    ab = float(s.alphas_cumprod[t])
    mean, var = math.sqrt(ab) * x0[0], 1 - ab
    se = math.sqrt(var / n)
    assert torch.all((xt.mean(0) - mean).abs() < 5 * se)
    assert torch.all((xt.var(0) / var - 1).abs() < 5 * math.sqrt(2 / n))
    # scalar t and per-row t agree; float32 in, float32 out
    assert torch.equal(xt, s.add_noise(x0, noise, t))
    assert s.add_noise(x0.float(), noise.float(), t).dtype == torch.float32


def test_step_matches_independent_formula_and_is_reproducible():
    s = DDPMScheduler(100)
    betas, ab, ab_prev = _tables()
    x = torch.randn(64, 2, dtype=torch.float64)
    eps = torch.randn(64, 2, dtype=torch.float64)
    for t in [99, 50, 1]:
        x0 = torch.sqrt(1 / ab[t]) * x - torch.sqrt(1 / ab[t] - 1) * eps
        mean = betas[t] * ab_prev[t].sqrt() / (1 - ab[t]) * x0 + (1 - ab_prev[t]) * (1 - betas[t]).sqrt() / (1 - ab[t]) * x
        var = betas[t] * (1 - ab_prev[t]) / (1 - ab[t])
        z = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        got = s.step(eps, t, x, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(got, mean + var.sqrt() * z)
        # same generator seed -> same result; per-row t equal to scalar t
        torch.testing.assert_close(s.step(eps, torch.full((64,), t), x, generator=torch.Generator().manual_seed(3)), got)
        assert not torch.equal(got, s.step(eps, t, x, generator=torch.Generator().manual_seed(4)))


def test_no_noise_at_t0():
    s = DDPMScheduler(100)
    x, eps = torch.randn(10, 2), torch.randn(10, 2)
    a = s.step(eps, 0, x, generator=torch.Generator().manual_seed(0))
    b = s.step(eps, 0, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    ab = s.alphas_cumprod[0].float()
    torch.testing.assert_close(a, torch.sqrt(1 / ab) * x - torch.sqrt(1 / ab - 1) * eps)
    assert float(s.get_variance(0)) == 0.0


@pytest.mark.parametrize("n_steps", [100, 20])
def test_point_mass_is_recovered_exactly(n_steps):
    """With the exact eps of a point mass at c, ancestral sampling ends exactly at c (also strided)."""
    s = DDPMScheduler(100)
    s.set_timesteps(n_steps)
    assert len(s.timesteps) == n_steps and int(s.timesteps[-1]) == 0
    c = torch.tensor([0.7, -1.3], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, generator=g, dtype=torch.float64)
    for t in s.timesteps.tolist():
        ab = s.alphas_cumprod[t]
        eps = (x - ab.sqrt() * c) / (1 - ab).sqrt()
        x = s.step(eps, t, x, generator=g)
    torch.testing.assert_close(x, c.expand_as(x), atol=1e-9, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        DDPMScheduler(100, beta_schedule="cosine")
    with pytest.raises(ValueError):
        DDPMScheduler(100).set_timesteps(101)


def test_sinusoidal_embedding():
    v = torch.tensor([0.0, 1.0, 3.5])
    e = sinusoidal_embedding(v, 128, scale=25.0)
    assert e.shape == (3, 128)
    freq = torch.exp(-math.log(10000.0) / 63 * torch.arange(64, dtype=torch.float64))
    arg = 25.0 * v.double()[:, None] * freq
    torch.testing.assert_close(e.double(), torch.cat([arg.sin(), arg.cos()], 1), atol=1e-5, rtol=0)
    assert torch.equal(SinusoidalEmbedding(128, 25.0)(v), e)
    assert sinusoidal_embedding(torch.tensor([3, 4]), 8).dtype == torch.get_default_dtype()
    with pytest.raises(ValueError):
        SinusoidalEmbedding(127)
