"""``GatedExperts``: E expert MLPs on a shared input, mixed by a gate, on the fused ``gated_experts`` op
(DESIGN.md 3.3). With n_experts=2 and the default sigmoid gate it is DualDiff's dual-expert denoiser
out = g * e1(h) + (1 - g) * e2(h).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from moekernels.ops.gated_experts import _gate_from_logits, gated_experts

__all__ = ["GatedExperts"]


class GatedExperts(nn.Module):
    """E expert MLPs with identical shapes, held as stacked parameters, plus a gate MLP.

    Each expert: Linear(in_dim, hidden); n_residual blocks a + Linear(relu(a)) (hidden -> hidden); then
    relu -> Linear for each width in ``head`` and finally relu -> Linear(.., out_dim).
    Gate: MLP on the same input through ``gate_hidden`` widths (relu between layers) to E softmax logits, or to one
    sigmoid logit when E == 2 and ``sigmoid_gate`` (the default for E == 2): gate = (g, 1 - g).

    Args:
        in_dim, hidden, out_dim: widths. n_experts: E. n_residual: residual blocks after the first layer.
        head: extra hidden widths before the output layer (e.g. (128,) for 256 -> 128 -> out).
        gate_hidden: hidden widths of the gate MLP (() = a linear gate).
        sigmoid_gate: None (default) = True when n_experts == 2.
        backend: passed to ``gated_experts`` ("auto" | "eager" | "cpu" | "triton" | "cuda").

    Parameters: ``weights[l]`` (E, in_l, out_l), ``biases[l]`` (E, out_l) per expert layer; ``gate_weights[j]``
    (in_j, out_j), ``gate_biases[j]`` (out_j,). Initialised like nn.Linear (per expert):
    U(-1/sqrt(in), 1/sqrt(in)) for weights and biases. Note the weights are stored (in, out) (x @ W), the
    transpose of nn.Linear.weight.

    forward(h) -> (out (B, out_dim), gate (B, E)). ``forward(h, return_experts=True)`` also returns the expert
    outputs (B, E, out_dim) (computed by the plain-PyTorch path, for losses on the individual experts).
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, n_experts: int = 2, n_residual: int = 3,
                 head: Sequence[int] = (), gate_hidden: Sequence[int] = (), *, sigmoid_gate: bool | None = None,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if min(in_dim, hidden, out_dim, n_experts) < 1 or n_residual < 0:
            raise ValueError("GatedExperts: in_dim, hidden, out_dim, n_experts must be >= 1 and n_residual >= 0")
        if sigmoid_gate is None:
            sigmoid_gate = n_experts == 2
        if sigmoid_gate and n_experts != 2:
            raise ValueError(f"GatedExperts: sigmoid_gate needs n_experts == 2, got {n_experts}")
        self.in_dim, self.hidden, self.out_dim = in_dim, hidden, out_dim
        self.n_experts, self.n_residual = n_experts, n_residual
        self.head, self.gate_hidden = tuple(int(w) for w in head), tuple(int(w) for w in gate_hidden)
        self.sigmoid_gate = bool(sigmoid_gate)
        self.backend = backend
        fk = {"device": device, "dtype": dtype}
        E = n_experts
        widths = [in_dim, hidden] + [hidden] * n_residual + list(self.head) + [out_dim]
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(E, i, o, **fk)) for i, o in zip(widths, widths[1:])])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(E, o, **fk)) for o in widths[1:]])
        gw = [in_dim] + list(self.gate_hidden) + [1 if self.sigmoid_gate else E]
        self.gate_weights = nn.ParameterList([nn.Parameter(torch.empty(i, o, **fk)) for i, o in zip(gw, gw[1:])])
        self.gate_biases = nn.ParameterList([nn.Parameter(torch.empty(o, **fk)) for o in gw[1:]])
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for W, b in zip(list(self.weights) + list(self.gate_weights), list(self.biases) + list(self.gate_biases)):
            bound = 1.0 / math.sqrt(W.shape[-2])
            W.uniform_(-bound, bound)
            b.uniform_(-bound, bound)

    @property
    def expert_params(self):
        return list(zip(self.weights, self.biases))

    @property
    def gate_params(self):
        return list(zip(self.gate_weights, self.gate_biases))

    def experts(self, h: torch.Tensor) -> torch.Tensor:
        """The expert outputs (B, E, out_dim) (plain PyTorch, differentiable)."""
        W0, b0 = self.weights[0], self.biases[0]
        a = torch.baddbmm(b0[:, None, :], h.expand(self.n_experts, *h.shape), W0)
        for l in range(1, len(self.weights)):
            r = torch.baddbmm(self.biases[l][:, None, :], torch.relu(a), self.weights[l])
            a = a + r if l <= self.n_residual else r
        return a.transpose(0, 1)

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """The gate weights (B, E) (plain PyTorch, differentiable)."""
        z = h
        for j, (W, b) in enumerate(self.gate_params):
            z = torch.addmm(b, z if j == 0 else torch.relu(z), W)
        return _gate_from_logits(z, self.n_experts)

    def forward(self, h: torch.Tensor, return_experts: bool = False):
        if return_experts:
            ys = self.experts(h)
            gate = self.gate(h)
            return (gate[:, :, None] * ys).sum(1), gate, ys
        return gated_experts(h, self.expert_params, self.gate_params, n_residual=self.n_residual,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, hidden={self.hidden}, out_dim={self.out_dim}, n_experts={self.n_experts}, "
                f"n_residual={self.n_residual}, head={self.head}, gate_hidden={self.gate_hidden}, "
                f"sigmoid_gate={self.sigmoid_gate}, backend={self.backend!r}")
