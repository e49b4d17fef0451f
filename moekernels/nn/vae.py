"""Small MLP VAEs for the MoE-latent pipeline of MoLR-MoG (arXiv 2601.01475): one VAE per class; a latent score
network is learned in each VAE's latent space and samples are decoded by the same VAE.

    vaes = ClassVAEs(n_classes=10, dim=64, latent_dim=8)
    train_vaes(vaes, x, y, steps=2000)                   # each class's VAE on that class's rows
    mu, log_var = vaes.encode(x, y)                       # (N, 8) each, row i by the VAE of class y[i]
    x_hat = vaes.decode(z, y)                             # (N, 64) in (-1, 1) (tanh)

Loss (per row, summed over pixels / latent dims): ||x - decode(z)||^2 / (2 sigma^2) + beta KL(q(z|x) || N(0, I)),
z = mu + exp(log_var / 2) eps (reparametrised), sigma = ``recon_sigma``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from moekernels.diffusion.training import TrainConfig, train

__all__ = ["VAE", "ClassVAEs", "train_vae", "train_vaes"]


def _mlp(sizes, act=nn.SiLU):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """MLP VAE: encoder dim -> hidden... -> (mu, log_var) (latent_dim each); decoder latent_dim -> reversed hidden
    -> dim, tanh output (data in [-1, 1]).

    Args: dim: data dimension. latent_dim: latent size (~8 for the digits). hidden: encoder widths (decoder
    mirrors them). recon_sigma: the decoder's fixed Gaussian std in the loss. beta: KL weight.
    """

    def __init__(self, dim: int = 64, latent_dim: int = 8, hidden=(128, 64), recon_sigma: float = 0.2,
                 beta: float = 1.0):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"VAE: dim must be an int >= 1, got {dim!r}")
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"VAE: latent_dim must be an int >= 1, got {latent_dim!r}")
        if not (isinstance(recon_sigma, (int, float)) and recon_sigma > 0 and math.isfinite(recon_sigma)):
            raise ValueError(f"VAE: recon_sigma must be a finite number > 0, got {recon_sigma!r}")
        if not (isinstance(beta, (int, float)) and beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"VAE: beta must be a finite number >= 0, got {beta!r}")
        try:
            hidden = tuple(hidden)
        except TypeError:
            raise ValueError(f"VAE: hidden must be a sequence of ints >= 1, got {hidden!r}") from None
        if any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden):
            raise ValueError(f"VAE: hidden must be a sequence of ints >= 1, got {hidden!r}")
        self.dim, self.latent_dim, self.recon_sigma, self.beta = dim, latent_dim, float(recon_sigma), float(beta)
        self.encoder = _mlp((dim,) + hidden + (2 * latent_dim,))
        self.decoder = _mlp((latent_dim,) + hidden[::-1] + (dim,))

    def _check(self, x, name, width):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != width:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"VAE: {name} must be a (N, {width}) tensor, got {shape}")

    def encode(self, x: torch.Tensor):
        """(mu, log_var) of q(z | x), (N, latent_dim) each."""
        self._check(x, "x", self.dim)
        mu, log_var = self.encoder(x).chunk(2, dim=-1)
        return mu, log_var.clamp(-12.0, 6.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder mean (N, dim) in (-1, 1)."""
        self._check(z, "z", self.latent_dim)
        return torch.tanh(self.decoder(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encoder mean): the deterministic round trip."""
        return self.decode(self.encode(x)[0])

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(loss, recon_mse, kl): negative ELBO per row (up to constants), mean squared pixel error, mean KL."""
        mu, log_var = self.encode(x)
        z = mu + (0.5 * log_var).exp() * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        x_hat = self.decode(z)
        rec = ((x - x_hat) ** 2).sum(-1)
        kl = 0.5 * (mu * mu + log_var.exp() - 1.0 - log_var).sum(-1)
        loss = (rec / (2 * self.recon_sigma ** 2) + self.beta * kl).mean()
        return loss, rec.mean() / self.dim, kl.mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)


class ClassVAEs(nn.Module):
    """One ``VAE`` per class in a ModuleList; ``encode``/``decode`` route row i to the VAE of class y[i]."""

    def __init__(self, n_classes: int = 10, dim: int = 64, latent_dim: int = 8, **vae_kwargs):
        super().__init__()
        if not isinstance(n_classes, int) or n_classes < 1:
            raise ValueError(f"ClassVAEs: n_classes must be an int >= 1, got {n_classes!r}")
        self.n_classes, self.dim, self.latent_dim = n_classes, dim, latent_dim
        self.vaes = nn.ModuleList(VAE(dim, latent_dim, **vae_kwargs) for _ in range(n_classes))

    def __getitem__(self, c: int) -> VAE:
        return self.vaes[c]

    def _route(self, y, n):
        y = torch.as_tensor(y)
        if y.shape != (n,) or y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ClassVAEs: y must be an integer tensor of shape ({n},), got {tuple(y.shape)} {y.dtype}")
        if n and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise ValueError(f"ClassVAEs: y must be in [0, {self.n_classes}), got range "
                             f"[{int(y.min())}, {int(y.max())}]")
        return y

    def encode(self, x: torch.Tensor, y):
        y = self._route(y, x.shape[0])
        mu = x.new_empty(x.shape[0], self.latent_dim)
        log_var = x.new_empty(x.shape[0], self.latent_dim)
        for c in y.unique().tolist():
            rows = y == c
            mu[rows], log_var[rows] = self.vaes[c].encode(x[rows])
        return mu, log_var

    def decode(self, z: torch.Tensor, y) -> torch.Tensor:
        y = self._route(y, z.shape[0])
        out = z.new_empty(z.shape[0], self.dim)
        for c in y.unique().tolist():
            rows = y == c
            out[rows] = self.vaes[c].decode(z[rows])
        return out

    def reconstruct(self, x: torch.Tensor, y) -> torch.Tensor:
        return self.decode(self.encode(x, y)[0], y)


def _vae_loss(model: VAE, batch: torch.Tensor, generator: torch.Generator):
    """``loss_fn`` for ``moekernels.diffusion.training.train``: the negative ELBO, with the MSE and KL recorded."""
    loss, rec, kl = model.loss(batch, generator=generator)
    return loss, {"recon_mse": rec.detach(), "kl": kl.detach()}


def train_vae(vae: VAE, x: torch.Tensor, steps: int = 2000, batch_size: int = 64, lr: float = 2e-3,
              seed: int = 0) -> list:
    """Train ``vae`` on the rows of x with the project's training loop (``moekernels.diffusion.training.train``):
    Adam (AdamW with weight_decay=0), cosine LR to 0, no gradient clipping, shuffled epochs with drop_last, batch
    min(batch_size, len(x)); the trained weights are ``vae``'s own (the loop's EMA copy is not used).
    Returns the per-step loss history."""
    if not isinstance(vae, VAE):
        raise ValueError(f"train_vae: vae must be a VAE, got {type(vae).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"train_vae: x must be a non-empty (N, {vae.dim}) tensor, got {shape}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"train_vae: steps must be an int >= 0, got {steps!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"train_vae: batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"train_vae: lr must be a finite number > 0, got {lr!r}")
    cfg = TrainConfig(steps=steps, batch_size=min(batch_size, len(x)), lr=float(lr), weight_decay=0.0,
                      grad_clip=None, seed=int(seed), checkpoint_every=0, progress=False)
    with torch.enable_grad():
        res = train(vae, x, _vae_loss, cfg)
    return res.history["loss"]


def train_vaes(vaes: ClassVAEs, x: torch.Tensor, y: torch.Tensor, steps: int = 2000, batch_size: int = 64,
               lr: float = 2e-3, seed: int = 0, progress: bool = False) -> dict:
    """Train VAE c on the rows with y == c, for every class. Returns {class: loss history}."""
    y = vaes._route(y, x.shape[0])
    out = {}
    classes = range(vaes.n_classes)
    if progress:
        from tqdm.auto import tqdm

        classes = tqdm(classes, desc="VAEs", leave=False)
    for c in classes:
        xc = x[y == c]
        if len(xc) == 0:
            raise ValueError(f"train_vaes: no rows of class {c}")
        out[c] = train_vae(vaes.vaes[c], xc, steps, batch_size, lr, seed=seed * 1000 + c)
    return out
