"""Reverse-time samplers for the SDE form of a ``Schedule`` (Song et al. 2021), optionally recentred on c.

Forward process with centre c (c = 0: the usual one): x_t = c + s(t) (x_0 - c) + gamma(t) eps, i.e.

    dx = f(t) (x - c) dt + g(t) dW,   f = d log s / dt,   g^2 = d gamma^2 / dt - 2 f gamma^2
    (VP: f = -beta / 2, g^2 = beta;  VE: f = 0, g^2 = d gamma^2 / dt)

The model predicts eps (``prediction="eps"``; score = -eps / gamma) or the score (``prediction="score"``).

* ``reverse_sde_sample``: Euler-Maruyama on dx = [f (x - c) - g^2 score] dt + g dW_bar from t = 1 to t_min.
* ``probability_flow_sample``: Euler on the probability-flow ODE dx = [f (x - c) - g^2 score / 2] dt.

Both use ``n_steps`` uniform steps on [t_min, 1] and end with the Tweedie denoise
x_0 = c + (x - c - gamma eps) / s at t_min (``denoise=True``). ``model(x, t)`` gets t as a (B,) tensor.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from moekernels.diffusion.schedules import DiscreteSchedule, Schedule, VPSchedule

__all__ = ["sde_coefficients", "reverse_sde_sample", "probability_flow_sample"]


def _derivative(fn, t: float, h: float = 1e-5) -> float:
    """d fn / dt at t in [0, 1] in float64: central differences inside, second-order one-sided at the ends."""
    if t - h < 0:
        return (-3 * fn(t) + 4 * fn(t + h) - fn(t + 2 * h)) / (2 * h)
    if t + h > 1:
        return (3 * fn(t) - 4 * fn(t - h) + fn(t - 2 * h)) / (2 * h)
    return (fn(t + h) - fn(t - h)) / (2 * h)


def sde_coefficients(schedule: Schedule, t: float):
    """(f(t), g(t)^2) of the forward SDE of ``schedule`` at a scalar t in [0, 1]: exact for ``VPSchedule``,
    second-order finite differences (float64) of log s and gamma^2 otherwise."""
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"sde_coefficients: t must be in [0, 1], got {t!r}")
    if isinstance(schedule, VPSchedule):
        b = float(schedule.beta(t))
        return -0.5 * b, b
    f = _derivative(lambda u: math.log(float(schedule.s(u))), t)
    dg2 = _derivative(lambda u: float(schedule.gamma(u)) ** 2, t)
    return f, dg2 - 2 * f * float(schedule.gamma(t)) ** 2


def _check(schedule, x_T, n_steps, t_min, center, prediction, where):
    if not isinstance(schedule, Schedule):
        raise ValueError(f"{where}: schedule must be a moekernels.diffusion Schedule, got {type(schedule).__name__}")
    if isinstance(schedule, DiscreteSchedule):
        raise ValueError(f"{where}: schedule must be a continuous-time Schedule (t in [0, 1]); a DiscreteSchedule's "
                         f"t is an integer DDPM step (use DDPMScheduler.step)")
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.dim() < 1:
        raise ValueError(f"{where}: x_T must be a floating-point tensor (B, ...)")
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"{where}: n_steps must be an int >= 1, got {n_steps!r}")
    if not (isinstance(t_min, (int, float)) and 0 < t_min < 1):
        raise ValueError(f"{where}: t_min must be a number in (0, 1), got {t_min!r}")
    if prediction not in ("eps", "score"):
        raise ValueError(f"{where}: prediction must be 'eps' or 'score', got {prediction!r}")
    if center is None:
        return torch.zeros((), dtype=x_T.dtype, device=x_T.device)
    center = torch.as_tensor(center, dtype=x_T.dtype, device=x_T.device)
    try:
        ok = torch.broadcast_shapes(center.shape, x_T.shape) == x_T.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{where}: center of shape {tuple(center.shape)} does not broadcast to x_T's shape "
                         f"{tuple(x_T.shape)}")
    if not bool(torch.isfinite(center).all()):
        raise ValueError(f"{where}: center must be finite")
    return center


def _eps(model, x, t, gamma, prediction):
    tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    out = model(x, tt)
    return out if prediction == "eps" else -gamma * out


@torch.no_grad()
def _integrate(model, schedule, x_T, n_steps, t_min, center, prediction, generator, denoise, stochastic):
    x = x_T.clone()
    ts = torch.linspace(1.0, t_min, n_steps + 1, dtype=torch.float64).tolist()
    for i in range(n_steps):
        t, dt = ts[i], ts[i] - ts[i + 1]  # dt > 0: we step backwards in time
        gamma = float(schedule.gamma(t))
        f, g2 = sde_coefficients(schedule, t)
        score = -_eps(model, x, t, gamma, prediction) / gamma
        if stochastic:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x - (f * (x - center) - g2 * score) * dt + (g2 * dt) ** 0.5 * z
        else:
            x = x - (f * (x - center) - 0.5 * g2 * score) * dt
    if denoise:
        s, gamma = float(schedule.s(t_min)), float(schedule.gamma(t_min))
        x = center + (x - center - gamma * _eps(model, x, t_min, gamma, prediction)) / s
    return x


def reverse_sde_sample(model: Callable, schedule: Schedule, x_T: torch.Tensor, n_steps: int = 500,
                       t_min: float = 1e-3, center=None, prediction: str = "eps",
                       generator: torch.Generator | None = None, denoise: bool = True) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE from x_T at t = 1 to t_min (then the Tweedie denoise).
    ``center``: None (0) or a tensor broadcastable to x_T (e.g. (B, D) per-row centres c_k)."""
    c = _check(schedule, x_T, n_steps, t_min, center, prediction, "reverse_sde_sample")
    return _integrate(model, schedule, x_T, n_steps, t_min, c, prediction, generator, denoise, True)


def probability_flow_sample(model: Callable, schedule: Schedule, x_T: torch.Tensor, n_steps: int = 500,
                            t_min: float = 1e-3, center=None, prediction: str = "eps",
                            denoise: bool = True) -> torch.Tensor:
    """Euler on the probability-flow ODE from x_T at t = 1 to t_min (then the Tweedie denoise); deterministic."""
    c = _check(schedule, x_T, n_steps, t_min, center, prediction, "probability_flow_sample")
    return _integrate(model, schedule, x_T, n_steps, t_min, c, prediction, None, denoise, False)
