"""Continuous-time noise schedules: x_t = s(t) x_0 + gamma(t) eps, t in [0, 1].

Every model in moekernels sees time only through (s(t), gamma(t)) (signal scale, noise std); the fused
``molr_mog_score`` takes them per row. Two schedules (Song et al. 2021, "Score-based generative modeling through
SDEs"):

* ``VPSchedule`` (variance preserving, the continuous DDPM): beta(t) = beta_min + t (beta_max - beta_min),
  alpha_bar(t) = exp(-int_0^t beta) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2)),
  s = sqrt(alpha_bar), gamma = sqrt(1 - alpha_bar)  (computed with expm1: accurate down to gamma ~ 1e-4 and below).
* ``VESchedule`` (variance exploding): s = 1, gamma(t) = sigma_min (sigma_max / sigma_min)^t.

``t`` may be a Python number (Python floats come back) or a tensor (tensors of t's dtype come back, computed in
float64 so that tiny gammas keep their digits).
"""
from __future__ import annotations

import math

import torch

__all__ = ["Schedule", "VPSchedule", "VESchedule", "DiscreteSchedule"]


def _f64(t):
    return t.to(torch.float64) if torch.is_tensor(t) else float(t)


def _back(v, t):
    return v.to(t.dtype if t.is_floating_point() else torch.get_default_dtype()) if torch.is_tensor(t) else float(v)


class Schedule:
    """Base class: subclasses define ``s(t)`` and ``gamma(t)``; ``schedule(t)`` returns both."""

    def s(self, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def gamma(self, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, t):
        return self.s(t), self.gamma(t)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = s(t) x0 + gamma(t) noise; t a number, or a (B,) tensor broadcast over x0's trailing dims."""
        s, g = self(t)
        if torch.is_tensor(t) and t.dim() > 0:
            shape = (-1,) + (1,) * (x0.dim() - 1)
            s, g = s.reshape(shape), g.reshape(shape)
        return s * x0 + g * noise

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class VPSchedule(Schedule):
    """Variance-preserving (continuous DDPM) schedule with linear beta(t) on [beta_min, beta_max]."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (0 <= beta_min <= beta_max):
            raise ValueError(f"VPSchedule: need 0 <= beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t):
        t64 = _f64(t)
        return _back(self.beta_min + t64 * (self.beta_max - self.beta_min), t)

    def _integral(self, t64):  # int_0^t beta
        return self.beta_min * t64 + 0.5 * (self.beta_max - self.beta_min) * t64 * t64

    def alpha_bar(self, t):
        B = self._integral(_f64(t))
        return _back(torch.exp(-B) if torch.is_tensor(B) else math.exp(-B), t)

    def s(self, t):
        B = self._integral(_f64(t))
        return _back(torch.exp(-0.5 * B) if torch.is_tensor(B) else math.exp(-0.5 * B), t)

    def gamma(self, t):
        B = self._integral(_f64(t))
        return _back(torch.sqrt(-torch.expm1(-B)) if torch.is_tensor(B) else math.sqrt(-math.expm1(-B)), t)


class VESchedule(Schedule):
    """Variance-exploding schedule: s = 1, gamma(t) = sigma_min (sigma_max / sigma_min)^t."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not (0 < sigma_min <= sigma_max):
            raise ValueError(f"VESchedule: need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def s(self, t):
        if torch.is_tensor(t):
            return torch.ones_like(t, dtype=t.dtype if t.is_floating_point() else torch.get_default_dtype())
        return 1.0

    def gamma(self, t):
        t64 = _f64(t)
        r = math.log(self.sigma_max / self.sigma_min)
        v = self.sigma_min * (torch.exp(r * t64) if torch.is_tensor(t64) else math.exp(r * t64))
        return _back(v, t)


class DiscreteSchedule(Schedule):
    """The (s, gamma) view of a discrete DDPM schedule: t is an integer timestep index into ``alphas_cumprod``,
    s = sqrt(alpha_bar_t), gamma = sqrt(1 - alpha_bar_t) (``DDPMScheduler.schedule()`` builds one). It lets the
    continuous-time score modules (``MoLRMoGScore``) run inside a DDPM."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ab.dim() != 1 or not bool(((ab > 0) & (ab < 1)).all()):
            raise ValueError("DiscreteSchedule: alphas_cumprod must be a 1-D tensor with values in (0, 1)")
        self.alphas_cumprod = ab

    def _at(self, table, t):
        if torch.is_tensor(t):
            if t.is_floating_point() and not bool((t == t.round()).all()):
                raise ValueError("DiscreteSchedule: t must hold integer timestep indices")
            # float64 for integer t (callers cast to their data's dtype), else t's dtype
            return table[t.long().cpu()].to(device=t.device, dtype=t.dtype if t.is_floating_point() else torch.float64)
        if int(t) != t:
            raise ValueError(f"DiscreteSchedule: t must be an integer timestep index, got {t}")
        return float(table[int(t)])

    def s(self, t):
        return self._at(self.alphas_cumprod.sqrt(), t)

    def gamma(self, t):
        return self._at((1 - self.alphas_cumprod).sqrt(), t)

    def __repr__(self):
        return f"DiscreteSchedule(T={len(self.alphas_cumprod)})"
