"""Discrete DDPM scheduler (Ho et al. 2020) with the names diffusers users know.

    sched = DDPMScheduler(num_train_timesteps=100, beta_start=1e-4, beta_end=0.02)   # linear betas
    x_t = sched.add_noise(x0, noise, t)                    # sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
    sched.set_timesteps(100)                               # sched.timesteps = [99, 98, ..., 0]
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, generator=g)     # -> the previous sample x_{t-1}

``step`` is the ancestral step of the tiny-diffusion / DualDiff baseline: x0_hat = sqrt(1/abar_t) x_t -
sqrt(1/abar_t - 1) eps_hat (no clipping), posterior mean coef1 x0_hat + coef2 x_t, plus sqrt(var) z with the
"fixed small" posterior variance var = beta_t (1 - abar_{t-1}) / (1 - abar_t) (clamped at 1e-20), and no noise at
t = 0. With fewer inference steps than training steps (``set_timesteps(n)``, n < T) it is diffusers' strided
form: the previous timestep is t - T // n and alpha_t, beta_t become abar_t / abar_prev, 1 - abar_t / abar_prev.

``t`` may be a Python int, a 0-d tensor or a (B,) tensor (rows may differ; the baseline steps a batch of equal t).
Tables are kept in float64 and cast to the sample's dtype at use.
"""
from __future__ import annotations

import torch

__all__ = ["DDPMScheduler"]


class DDPMScheduler:
    def __init__(self, num_train_timesteps: int = 100, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: str = "linear"):
        if beta_schedule != "linear":
            raise ValueError(f"only the linear beta schedule is implemented, got {beta_schedule!r}")
        if num_train_timesteps < 1:
            raise ValueError("num_train_timesteps must be >= 1")
        self.num_train_timesteps = T = int(num_train_timesteps)
        self.betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.num_inference_steps = T
        self.timesteps = torch.arange(T - 1, -1, -1)

    # ------------------------------------------------------------------------------------------ helpers
    def _gather(self, table: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
        """table[t] as a column broadcastable against ``like`` (B, ...), in like's dtype/device."""
        t = torch.as_tensor(t, dtype=torch.long)
        v = table[t.cpu()].to(device=like.device, dtype=like.dtype)
        if v.dim() == 0:
            return v
        return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))

    def _abar_prev_table(self, step_ratio: int) -> torch.Tensor:
        T = self.num_train_timesteps
        prev = torch.arange(T) - step_ratio
        out = torch.ones(T, dtype=torch.float64)
        ok = prev >= 0
        out[ok] = self.alphas_cumprod[prev[ok]]
        return out

    @property
    def step_ratio(self) -> int:
        return self.num_train_timesteps // self.num_inference_steps

    # ------------------------------------------------------------------------------------------ API
    def set_timesteps(self, num_inference_steps: int) -> None:
        n = int(num_inference_steps)
        if not 1 <= n <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {n}")
        self.num_inference_steps = n
        self.timesteps = (torch.arange(n) * self.step_ratio).flip(0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        ab = self._gather(self.alphas_cumprod, timesteps, original_samples)
        return ab.sqrt() * original_samples + (1 - ab).sqrt() * noise

    def get_variance(self, t) -> torch.Tensor:
        """Fixed-small posterior variance at t (float64; 0 at t = 0)."""
        t = torch.as_tensor(t, dtype=torch.long)
        ab = self.alphas_cumprod[t]
        ab_prev = self._abar_prev_table(self.step_ratio)[t]
        beta_t = 1 - ab / ab_prev
        var = (beta_t * (1 - ab_prev) / (1 - ab)).clamp(min=1e-20)
        return torch.where(t > 0, var, torch.zeros_like(var))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t - step_ratio} given the predicted noise ``model_output``."""
        t = torch.as_tensor(timestep, dtype=torch.long).cpu()
        ab_prev_tab = self._abar_prev_table(self.step_ratio)
        ab = self._gather(self.alphas_cumprod, t, sample)
        ab_prev = self._gather(ab_prev_tab, t, sample)
        alpha_t = ab / ab_prev
        beta_t = 1 - alpha_t
        x0 = (1 / ab).sqrt() * sample - (1 / ab - 1).sqrt() * model_output
        coef1 = beta_t * ab_prev.sqrt() / (1 - ab)
        coef2 = (1 - ab_prev) * alpha_t.sqrt() / (1 - ab)
        prev = coef1 * x0 + coef2 * sample
        if bool((t > 0).any()):
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            var = self.get_variance(t).to(device=sample.device, dtype=sample.dtype)
            if var.dim() > 0:
                var = var.reshape(var.shape[0], *([1] * (sample.dim() - 1)))
            prev = prev + var.sqrt() * noise
        return prev

    def schedule(self):
        """The (s, gamma) view of this scheduler for continuous-time score modules (t = integer index)."""
        from moekernels.diffusion.schedules import DiscreteSchedule

        return DiscreteSchedule(self.alphas_cumprod)

    def __len__(self) -> int:
        return self.num_train_timesteps
