"""moekernels.nn.vae: shapes, per-class routing, and that short training makes the VAEs round-trip."""
import pytest
import torch

from moekernels.nn.vae import VAE, ClassVAEs, train_vae, train_vaes


pytestmark = pytest.mark.usefixtures("one_thread")



def _toy(n=256, dim=16, seed=0):
    """Data on a 2-D nonlinear manifold in [-1, 1]^dim."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(2, dim, generator=g)
    z = torch.randn(n, 2, generator=g)
    return torch.tanh(z @ W * 0.7)


def test_shapes():
    v = VAE(dim=16, latent_dim=3, hidden=(32, 16))
    x = _toy(10)
    mu, log_var = v.encode(x)
    assert mu.shape == (10, 3) and log_var.shape == (10, 3)
    assert v.decode(mu).shape == (10, 16) and v.reconstruct(x).shape == (10, 16)
    assert v.decode(torch.randn(5, 3) * 100).abs().max() <= 1.0
    assert v.loss(x, generator=torch.Generator().manual_seed(0))[0].dim() == 0


def test_loss_is_the_negative_elbo():
    """The loss against torch.distributions: Gaussian KL to N(0, I) and the reparametrised reconstruction term."""
    from torch.distributions import Normal, kl_divergence

    v = VAE(dim=16, latent_dim=3, hidden=(32, 16), recon_sigma=0.3, beta=0.7).double()
    x = _toy(10).double()
    with torch.no_grad():
        loss, rec, kl = v.loss(x, generator=torch.Generator().manual_seed(5))
        mu, log_var = v.encode(x)
        std = (0.5 * log_var).exp()
        kl_ref = kl_divergence(Normal(mu, std), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)
        z = mu + std * torch.randn(mu.shape, generator=torch.Generator().manual_seed(5), dtype=mu.dtype)
        sq = ((x - v.decode(z)) ** 2).sum(-1)
    assert float(kl) == pytest.approx(float(kl_ref.mean()), rel=1e-12)
    assert float(rec) == pytest.approx(float(sq.mean()) / 16, rel=1e-12)
    assert float(loss) == pytest.approx(float((sq / (2 * 0.3 ** 2) + 0.7 * kl_ref).mean()), rel=1e-12)


def test_vae_round_trip_after_short_training():
    torch.manual_seed(0)
    x = _toy()
    v = VAE(dim=16, latent_dim=4, hidden=(64, 32), beta=0.05)
    with torch.no_grad():
        before = float(((v.reconstruct(x) - x) ** 2).mean())
    hist = train_vae(v, x, steps=300, batch_size=64, lr=3e-3, seed=0)
    with torch.no_grad():
        after = float(((v.reconstruct(x) - x) ** 2).mean())
    assert after < 0.2 * before, (before, after)
    assert hist[-1] < hist[0]


def test_class_vaes_route_rows_to_their_class():
    torch.manual_seed(0)
    x0, x1 = _toy(128, seed=1), -_toy(128, seed=2)
    x = torch.cat((x0, x1))
    y = torch.cat((torch.zeros(128, dtype=torch.long), torch.ones(128, dtype=torch.long)))
    vaes = ClassVAEs(2, 16, 3, hidden=(32, 16))
    train_vaes(vaes, x, y, steps=150, batch_size=64, lr=3e-3)
    mu, _log_var = vaes.encode(x, y)
    with torch.no_grad():
        assert torch.allclose(mu[:5], vaes[0].encode(x[:5])[0])
        assert torch.allclose(mu[-5:], vaes[1].encode(x[-5:])[0])
        out = vaes.decode(mu, y)
        assert torch.allclose(out[-3:], vaes[1].decode(mu[-3:]))
        rec = vaes.reconstruct(x, y)
        assert torch.allclose(rec[:4], vaes[0].reconstruct(x[:4])) and torch.allclose(rec[-4:], vaes[1].reconstruct(x[-4:]))
        # each VAE was trained on its own class: it reconstructs that class better than the other VAE does
        def err(c, rows):
            return float(((vaes[c].reconstruct(x[rows]) - x[rows]) ** 2).mean())

        assert err(0, y == 0) < err(1, y == 0) and err(1, y == 1) < err(0, y == 1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="latent_dim"):
        VAE(16, 0)
    with pytest.raises(ValueError, match="recon_sigma"):
        VAE(16, 2, recon_sigma=0.0)
    with pytest.raises(ValueError, match="x must"):
        VAE(16, 2).encode(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="z must"):
        VAE(16, 2).decode(torch.zeros(3, 5))
    vaes = ClassVAEs(2, 16, 2)
    with pytest.raises(ValueError, match="y must"):
        vaes.encode(torch.zeros(3, 16), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="n_classes"):
        ClassVAEs(0)
    with pytest.raises(ValueError, match="steps"):
        train_vae(VAE(16, 2), torch.zeros(4, 16), steps=-1)
    with pytest.raises(ValueError, match="x must"):
        train_vae(VAE(16, 2), torch.zeros(0, 16))
    with pytest.raises(ValueError, match="hidden"):
        VAE(16, 2, hidden=(8, 0))
    with pytest.raises(ValueError, match="beta"):
        VAE(16, 2, beta=float("nan"))
