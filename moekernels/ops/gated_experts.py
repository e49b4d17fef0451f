"""Gated combination of E expert MLPs (DESIGN.md section 3.3): the experts evaluated together (one batched GEMM per
layer over the stacked weights, never E separate modules), mixed by a softmax (E = 2: sigmoid) gate.

Expert e (identical shapes, weights stacked as W_l (E, in_l, out_l), b_l (E, out_l)):
    layer 0:                 a_0 = h W0_e + b0_e                    (h is shared: one (B x in) x (in x E*out0) GEMM)
    layers 1..n_residual:    a_l = a_{l-1} + relu(a_{l-1}) W_l,e + b_l,e     (residual blocks, in_l == out_l)
    remaining layers:        a_l = relu(a_{l-1}) W_l,e + b_l,e
    y_e = a_{L-1}
Gate MLP on h (gW_j (in_j, out_j), gb_j (out_j,), relu between layers): logits z (B, E) -> gate = softmax(z);
or, when E == 2 and the last out_j == 1: g = sigmoid(z), gate = (g, 1 - g)   (DualDiff's g e1 + (1 - g) e2).
    out = sum_e gate_e * y_e

Ladder: kernels (csrc/cpu/gated_experts_cpu.cpp, csrc/cuda/gated_experts_*, ops/triton/gated_experts.py)
-> ``GatedExpertsFn`` -> ``gated_experts`` -> ``moekernels.nn.GatedExperts``.

Kernel contract (every fused backend; ``_kernel_forward`` / ``_kernel_backward`` below are the plain-PyTorch
statement of it, used by the tests and readable as the spec):
    forward(h (B,in), Ws: list of (E,in_l,out_l), bs: list of (E,out_l), gWs: list of (in_j,out_j), gbs: list of
            (out_j,), n_residual: int) -> (out (B,out), gate (B,E), saved: list[Tensor])
    saved = [a_0, ..., a_{L-1}, z_0, ..., z_{G-1}]: the pre-activation of every layer, expert layers first as
            (B, E, out_l) (row-major, experts side by side in a row: the layout of the shared layer-0 GEMM; a_{L-1}
            is the expert outputs y), then the gate layers as (B, out_j) (z_{G-1} = the gate logits).
    backward(g_out (B,out), g_gate (B,E), h, Ws, bs, gWs, gbs, n_residual, saved, gate)
            -> (dh (B,in), dWs, dbs, dgWs, dgbs)   (lists shaped like Ws, bs, gWs, gbs)
All tensors contiguous, same dtype and device; accumulate in float32 (float64 for float64 inputs).
Compiled op names: torch.ops.moekernels.gated_experts_fwd / gated_experts_bwd (schemas in csrc/ops.cpp), and the
optional gated_experts_infer(h, Ws, bs, gWs, gbs, n_residual) -> (out, gate): the forward without saved activations,
used when no gradient is needed and the device has a kernel for it (the CPU does); and the optional
gated_experts_bwd_params(same arguments as backward) -> (dWs, dbs, dgWs, dgbs), used when h needs no gradient.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from moekernels import _extension
from moekernels.ops import dispatch

__all__ = ["GatedExpertsOutput", "gated_experts", "gated_experts_ref", "gated_experts_eager", "GatedExpertsFn",
           "SPEC"]


class GatedExpertsOutput(NamedTuple):
    out: torch.Tensor  # (B, out) sum_e gate_e * expert_e(h)
    gate: torch.Tensor  # (B, E) gate weights (rows sum to 1)


def _gate_from_logits(z: torch.Tensor, E: int) -> torch.Tensor:
    if z.shape[-1] == 1 and E == 2:
        g = torch.sigmoid(z)
        return torch.cat([g, 1.0 - g], dim=-1)
    return torch.softmax(z, dim=-1)


# ----------------------------------------------------------------------------------------------- references
def gated_experts_ref(h, expert_params, gate_params, *, n_residual: int):
    """Readable reference: a Python loop over the experts with F.linear, line by line from the formula.
    Returns (out (B, out), gate (B, E))."""
    E = expert_params[0][0].shape[0]
    ys = []
    for e in range(E):
        a = None
        for l, (W, b) in enumerate(expert_params):
            if l == 0:
                a = F.linear(h, W[e].T, b[e])
            elif l <= n_residual:
                a = a + F.linear(torch.relu(a), W[e].T, b[e])
            else:
                a = F.linear(torch.relu(a), W[e].T, b[e])
        ys.append(a)
    z = h
    for j, (W, b) in enumerate(gate_params):
        z = F.linear(z if j == 0 else torch.relu(z), W.T, b)
    gate = _gate_from_logits(z, E)
    out = sum(gate[:, e:e + 1] * ys[e] for e in range(E))
    return out, gate


def _first_layer_cat(W0: torch.Tensor) -> torch.Tensor:
    """(E, in, o) -> (in, E*o): the E blocks side by side, for the one shared-input GEMM."""
    E, n_in, o = W0.shape
    return W0.permute(1, 0, 2).reshape(n_in, E * o)


def gated_experts_eager(h, expert_params, gate_params, *, n_residual: int):
    """The fastest plain-PyTorch form (the ``eager`` backend and a benchmark baseline): layer 0 as one GEMM
    against the E weight blocks side by side (h is shared), the other layers as one baddbmm over the E stacked
    experts. Returns (out, gate); differentiable by autograd."""
    W0, b0 = expert_params[0]
    E, _, o0 = W0.shape
    B = h.shape[0]
    a = torch.addmm(b0.reshape(1, E * o0), h, _first_layer_cat(W0)).view(B, E, o0).transpose(0, 1)  # (E, B, o0)
    for l, (W, b) in enumerate(expert_params[1:], start=1):
        r = torch.baddbmm(b[:, None, :], torch.relu(a), W)
        a = a + r if l <= n_residual else r
    z = h
    for j, (W, b) in enumerate(gate_params):
        z = torch.addmm(b, z if j == 0 else torch.relu(z), W)
    gate = _gate_from_logits(z, E)
    out = torch.einsum("be,ebo->bo", gate, a)
    return out, gate


# ----------------------------------------------------------------------------------------------- kernel contract
def _kernel_forward(h, Ws, bs, gWs, gbs, n_residual):
    """The kernel contract's forward in plain PyTorch (no autograd needed): (out, gate, saved)."""
    E, _, o0 = Ws[0].shape
    B = h.shape[0]
    saved = [torch.addmm(bs[0].reshape(1, E * o0), h, _first_layer_cat(Ws[0])).view(B, E, o0)]
    for l in range(1, len(Ws)):
        prev = saved[-1]
        r = torch.baddbmm(bs[l][:, None, :], torch.relu(prev).transpose(0, 1), Ws[l]).transpose(0, 1)  # (B, E, o)
        saved.append((prev + r if l <= n_residual else r).contiguous())
    z = h
    for j in range(len(gWs)):
        z = torch.addmm(gbs[j], z if j == 0 else torch.relu(z), gWs[j])
        saved.append(z)
    gate = _gate_from_logits(z, E)
    out = torch.einsum("be,beo->bo", gate, saved[len(Ws) - 1])
    return out, gate, saved


def _kernel_backward(g_out, g_gate, h, Ws, bs, gWs, gbs, n_residual, saved, gate):
    """The kernel contract's backward in plain PyTorch: (dh, dWs, dbs, dgWs, dgbs)."""
    L, G = len(Ws), len(gWs)
    E = Ws[0].shape[0]
    B = h.shape[0]
    a, z = saved[:L], saved[L:]
    y = a[L - 1]  # (B, E, out)
    # mix: out = sum_e gate_e y_e
    dgate = g_gate + torch.einsum("bo,beo->be", g_out, y)
    g = gate[:, :, None] * g_out[:, None, :]  # (B, E, out) = dL/da_{L-1}
    # gate head
    if z[G - 1].shape[1] == 1 and E == 2:
        p = gate[:, :1]
        dz = (dgate[:, :1] - dgate[:, 1:]) * p * (1.0 - p)
    else:
        dz = gate * (dgate - (gate * dgate).sum(-1, keepdim=True))
    dgWs, dgbs = [None] * G, [None] * G
    dh = None
    for j in range(G - 1, -1, -1):
        inp = h if j == 0 else torch.relu(z[j - 1])
        dgWs[j] = inp.T @ dz
        dgbs[j] = dz.sum(0)
        dinp = dz @ gWs[j].T
        if j == 0:
            dh = dinp
        else:
            dz = dinp * (z[j - 1] > 0)
    # experts, last layer down to layer 1
    dWs, dbs = [None] * L, [None] * L
    for l in range(L - 1, 0, -1):
        prev = a[l - 1]
        gt = g.transpose(0, 1)  # (E, B, o)
        dWs[l] = torch.bmm(torch.relu(prev).transpose(0, 1).transpose(1, 2), gt)  # (E, in, o)
        dbs[l] = g.sum(0)
        dr = torch.bmm(gt, Ws[l].transpose(1, 2)).transpose(0, 1) * (prev > 0)  # (B, E, in)
        g = g + dr if l <= n_residual else dr
    o0 = Ws[0].shape[2]
    gcat = g.reshape(B, E * o0)
    dWs[0] = (h.T @ gcat).view(-1, E, o0).permute(1, 0, 2).contiguous()
    dbs[0] = g.sum(0)
    dh = dh + gcat @ _first_layer_cat(Ws[0]).T
    return dh, dWs, dbs, dgWs, dgbs


class _PyImpl:
    forward = staticmethod(_kernel_forward)
    backward = staticmethod(_kernel_backward)


class _TorchOpsImpl:
    """The compiled kernels (cpu and cuda register under the same torch.ops names)."""

    @staticmethod
    def forward(h, Ws, bs, gWs, gbs, n_residual):
        return torch.ops.moekernels.gated_experts_fwd(h, Ws, bs, gWs, gbs, n_residual)

    @staticmethod
    def backward(g_out, g_gate, h, Ws, bs, gWs, gbs, n_residual, saved, gate):
        return torch.ops.moekernels.gated_experts_bwd(g_out, g_gate, h, Ws, bs, gWs, gbs, n_residual, saved, gate)


def _impl(backend: str):
    """One backend's kernels (the contract in the module docstring). "python" is the plain-PyTorch statement of
    the contract (tests only)."""
    if backend == "triton":
        from moekernels.ops.triton import gated_experts as tri

        return tri
    if backend == "python":
        return _PyImpl
    return _TorchOpsImpl


class GatedExpertsFn(torch.autograd.Function):
    """Fused forward/backward on a compiled or Triton backend. apply(h, n_residual, n_layers, backend, *Ws, *bs,
    *gWs, *gbs) with n_layers = L (the gate has the rest: G = (len(params) - 2 L) / 2). Saves the inputs, the
    pre-activations of every layer and the gate."""

    @staticmethod
    def forward(ctx, h, n_residual: int, n_layers: int, backend: str, *params):
        L = n_layers
        G = (len(params) - 2 * L) // 2
        Ws, bs = list(params[:L]), list(params[L:2 * L])
        gWs, gbs = list(params[2 * L:2 * L + G]), list(params[2 * L + G:])
        out, gate, saved = _impl(backend).forward(h, Ws, bs, gWs, gbs, n_residual)
        ctx.meta = (n_residual, L, G, backend, len(saved))
        ctx.save_for_backward(h, *params, *saved, gate)
        return out, gate

    @staticmethod
    def backward(ctx, g_out, g_gate):
        n_residual, L, G, backend, n_saved = ctx.meta
        t = ctx.saved_tensors
        h, params, saved, gate = t[0], t[1:1 + 2 * L + 2 * G], list(t[1 + 2 * L + 2 * G:-1]), t[-1]
        Ws, bs = list(params[:L]), list(params[L:2 * L])
        gWs, gbs = list(params[2 * L:2 * L + G]), list(params[2 * L + G:])
        g_out = torch.zeros(h.shape[0], Ws[-1].shape[2], dtype=h.dtype, device=h.device) if g_out is None \
            else g_out.contiguous()
        g_gate = torch.zeros_like(gate) if g_gate is None else g_gate.contiguous()
        if not ctx.needs_input_grad[0] and backend in ("cpu", "cuda") and \
                dispatch.has_kernel("gated_experts_bwd_params", backend):
            # h needs no gradient (e.g. a fixed embedding): the optional kernel that skips dh's two GEMMs
            dh = None
            dWs, dbs, dgWs, dgbs = torch.ops.moekernels.gated_experts_bwd_params(
                g_out, g_gate, h, Ws, bs, gWs, gbs, n_residual, saved, gate)
        else:
            dh, dWs, dbs, dgWs, dgbs = _impl(backend).backward(
                g_out, g_gate, h, Ws, bs, gWs, gbs, n_residual, saved, gate)
        return (dh, None, None, None, *dWs, *dbs, *dgWs, *dgbs)


# ----------------------------------------------------------------------------------------------- checks
def _pairs(name, params):
    if not isinstance(params, (list, tuple)) or len(params) == 0:
        raise ValueError(f"gated_experts: {name} must be a non-empty list of (W, b) pairs, got {type(params).__name__}")
    out = []
    for i, p in enumerate(params):
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise ValueError(f"gated_experts: {name}[{i}] must be a (W, b) pair")
        out.append(tuple(p))
    return out


def _check(h, expert_params, gate_params, n_residual):
    if not isinstance(h, torch.Tensor):
        raise ValueError(f"gated_experts: h must be a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in dispatch.FLOAT_DTYPES:
        raise ValueError(f"gated_experts: h must be a floating-point tensor, got dtype {h.dtype}")
    if h.dim() != 2:
        raise ValueError(f"gated_experts: h must be (B, in), got shape {tuple(h.shape)}")
    ep = _pairs("expert_params", expert_params)
    gp = _pairs("gate_params", gate_params)
    for name, pairs in (("expert_params", ep), ("gate_params", gp)):
        for i, (W, b) in enumerate(pairs):
            for what, t in (("W", W), ("b", b)):
                nm = f"{name}[{i}] {what}"
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"gated_experts: {nm} must be a torch.Tensor, got {type(t).__name__}")
                if t.device != h.device:
                    raise ValueError(f"gated_experts: {nm} is on {t.device} but h is on {h.device}")
                if t.dtype != h.dtype:
                    raise ValueError(f"gated_experts: {nm} has dtype {t.dtype} but h has dtype {h.dtype}")
    if isinstance(n_residual, bool) or not isinstance(n_residual, int) or not 0 <= n_residual <= len(ep) - 1:
        raise ValueError(f"gated_experts: n_residual must be an int in [0, {len(ep) - 1}] (layers after the first), "
                         f"got {n_residual!r}")
    W0 = ep[0][0]
    if W0.dim() != 3 or W0.shape[0] < 1:
        raise ValueError(f"gated_experts: expert_params[0] W must be (E, in, out) with E >= 1, got shape {tuple(W0.shape)}")
    E = W0.shape[0]
    n_in = h.shape[1]
    for l, (W, b) in enumerate(ep):
        if W.dim() != 3 or W.shape[0] != E or W.shape[1] != n_in or W.shape[2] < 1:
            raise ValueError(f"gated_experts: expert_params[{l}] W must be (E, in, out)=({E}, {n_in}, out >= 1), "
                             f"got shape {tuple(W.shape)}" + (" (in must match h's width)" if l == 0 else ""))
        if tuple(b.shape) != (E, W.shape[2]):
            raise ValueError(f"gated_experts: expert_params[{l}] b must be (E, out)=({E}, {W.shape[2]}), got shape {tuple(b.shape)}")
        if 1 <= l <= n_residual and W.shape[1] != W.shape[2]:
            raise ValueError(f"gated_experts: expert_params[{l}] W is a residual layer (n_residual={n_residual}) and "
                             f"must be square, got shape {tuple(W.shape)}")
        n_in = W.shape[2]
    n_in = h.shape[1]
    for j, (W, b) in enumerate(gp):
        if W.dim() != 2 or W.shape[0] != n_in or W.shape[1] < 1:
            raise ValueError(f"gated_experts: gate_params[{j}] W must be (in, out)=({n_in}, out >= 1), got shape {tuple(W.shape)}")
        if tuple(b.shape) != (W.shape[1],):
            raise ValueError(f"gated_experts: gate_params[{j}] b must be (out,)=({W.shape[1]},), got shape {tuple(b.shape)}")
        n_in = W.shape[1]
    if not (n_in == E or (E == 2 and n_in == 1)):
        raise ValueError(f"gated_experts: gate_params[-1] W must output E={E} logits (or 1 sigmoid logit when E == 2), "
                         f"got {n_in}")
    return ep, gp


SPEC = dispatch.OpSpec(
    name="gated_experts",
    dtypes={"eager": dispatch.FLOAT_DTYPES, "cpu": (torch.float32, torch.float64),
            "cuda": (torch.float16, torch.bfloat16, torch.float32),
            "triton": (torch.float16, torch.bfloat16, torch.float32)},
    cuda_order=("triton", "cuda"),  # Triton: tensor cores + fused head; the CUDA GEMM tiles are FMA-only
    kernel="gated_experts_fwd",
    triton_module="gated_experts",
)


# ----------------------------------------------------------------------------------------------- public op
def gated_experts(h, expert_params, gate_params, *, n_residual: int, backend: str = "auto") -> GatedExpertsOutput:
    """E gated expert MLPs on a shared input, evaluated together and mixed by the gate.

    Args:
        h: (B, in) shared input (computed once for all experts).
        expert_params: [(W_l (E, in_l, out_l), b_l (E, out_l)), ...] per layer; layer 0 takes h, layers
            1..n_residual are residual blocks a + relu(a) W + b (square), the rest relu(a) W + b.
        gate_params: [(W_j (in_j, out_j), b_j (out_j,)), ...]: the gate MLP on h (relu between layers); the last
            out_j is E (softmax) or, for E == 2, 1 (sigmoid: gate = (g, 1 - g)).
        n_residual: number of residual blocks after layer 0.
        backend: "auto" | "eager" | "cpu" | "triton" | "cuda".

    Returns:
        GatedExpertsOutput(out (B, out_{L-1}), gate (B, E)); differentiable in h and every W, b.
    """
    ep, gp = _check(h, expert_params, gate_params, n_residual)
    tensors = {"h": h}
    for l, (W, b) in enumerate(ep):
        tensors[f"W{l}"], tensors[f"b{l}"] = W, b
    which = dispatch.resolve(SPEC, backend, tensors)
    if which == "eager":
        out, gate = gated_experts_eager(h, ep, gp, n_residual=n_residual)
    else:
        params = [W.contiguous() for W, _ in ep] + [b.contiguous() for _, b in ep] + \
                 [W.contiguous() for W, _ in gp] + [b.contiguous() for _, b in gp]
        needs_grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in params))
        L, G = len(ep), len(gp)
        if not needs_grad and which in ("cpu", "cuda") and dispatch.has_kernel("gated_experts_infer", which):
            # inference: no activations written out (optional kernel; the CPU has one)
            out, gate = torch.ops.moekernels.gated_experts_infer(
                h.contiguous(), params[:L], params[L:2 * L], params[2 * L:2 * L + G], params[2 * L + G:], n_residual)
        else:
            out, gate = GatedExpertsFn.apply(h.contiguous(), n_residual, L, which, *params)
    return GatedExpertsOutput(out, gate)


if _extension.available():  # fake (meta) kernels so torch.compile can trace through the compiled ops
    try:
        @torch.library.register_fake("moekernels::gated_experts_fwd")
        def _fwd_fake(h, Ws, bs, gWs, gbs, n_residual):
            B, E = h.shape[0], Ws[0].shape[0]
            saved = [h.new_empty(B, E, W.shape[2]) for W in Ws] + [h.new_empty(B, W.shape[1]) for W in gWs]
            return h.new_empty(B, Ws[-1].shape[2]), h.new_empty(B, E), saved

        @torch.library.register_fake("moekernels::gated_experts_bwd")
        def _bwd_fake(g_out, g_gate, h, Ws, bs, gWs, gbs, n_residual, saved, gate):
            return (torch.empty_like(h), [torch.empty_like(W) for W in Ws], [torch.empty_like(b) for b in bs],
                    [torch.empty_like(W) for W in gWs], [torch.empty_like(b) for b in gbs])
    except RuntimeError:  # an extension built before these schemas existed: the backends report it
        pass
    try:
        @torch.library.register_fake("moekernels::gated_experts_bwd_params")
        def _bwd_params_fake(g_out, g_gate, h, Ws, bs, gWs, gbs, n_residual, saved, gate):
            return ([torch.empty_like(W) for W in Ws], [torch.empty_like(b) for b in bs],
                    [torch.empty_like(W) for W in gWs], [torch.empty_like(b) for b in gbs])
    except RuntimeError:  # optional op, absent from older builds
        pass
    try:
        @torch.library.register_fake("moekernels::gated_experts_infer")
        def _infer_fake(h, Ws, bs, gWs, gbs, n_residual):
            return h.new_empty(h.shape[0], Ws[-1].shape[2]), h.new_empty(h.shape[0], Ws[0].shape[0])
    except RuntimeError:  # optional op, absent from older builds
        pass
