"""Sinusoidal embedding (Vaswani et al. 2017; the tiny-diffusion / DualDiff form).

For a scalar input v and an even ``size`` = 2h: freq_i = exp(-i ln(10000) / (h - 1)), i = 0..h-1;
emb = [sin(scale v freq), cos(scale v freq)] (sines first). The DualDiff baseline uses size 128 with scale 25
for each coordinate and scale 1 for the integer timestep.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["sinusoidal_embedding", "SinusoidalEmbedding"]


def sinusoidal_embedding(v: torch.Tensor, size: int, scale: float = 1.0) -> torch.Tensor:
    """``v`` (...,) -> (..., size) in ``v``'s floating dtype (float32 for integer ``v``)."""
    if size % 2 or size < 4:
        raise ValueError(f"size must be even and >= 4, got {size}")
    dtype = v.dtype if v.is_floating_point() else torch.get_default_dtype()
    half = size // 2
    freq = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, device=v.device, dtype=dtype))
    arg = (v.to(dtype) * scale).unsqueeze(-1) * freq
    return torch.cat((torch.sin(arg), torch.cos(arg)), dim=-1)


class SinusoidalEmbedding(nn.Module):
    """Module form of :func:`sinusoidal_embedding` (no parameters)."""

    def __init__(self, size: int, scale: float = 1.0):
        super().__init__()
        if size % 2 or size < 4:
            raise ValueError(f"size must be even and >= 4, got {size}")
        self.size, self.scale = size, float(scale)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(v, self.size, self.scale)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}"
