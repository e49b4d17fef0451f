"""gated_experts: eager vs ref, every backend vs the ref (forward and gradients), gradcheck, the kernel contract's
saved layout, edge cases (B=0/1, non-contiguous h), errors, and nn.GatedExperts (parameter count, forward)."""
import sys

import pytest
import torch

from moekernels.nn import GatedExperts
from moekernels.ops import dispatch
from moekernels.ops.gated_experts import (SPEC, GatedExpertsFn, _impl, gated_experts, gated_experts_eager,
                                          gated_experts_ref)
from tests.conftest import backend_or_skip

ge_module = sys.modules["moekernels.ops.gated_experts"]

BACKENDS = ["eager", "cpu", "triton", "cuda"]

# (E, n_residual, head widths, gate hidden widths, sigmoid gate)
CONFIGS = [
    (2, 3, (), (), True),  # DualDiff-shaped: sigmoid gate, 3 residual blocks
    (2, 0, (5,), (4,), True),  # extra head layer, no residual, gate MLP
    (3, 0, (), (6,), False),  # softmax gate
    (4, 3, (6, 4), (), False),  # softmax gate, residual blocks and two head layers
    (2, 1, (), (3, 5), False),  # E = 2 with a softmax gate over 2 logits
]


def _device(backend):
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("cuda backend: no CUDA device")
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def make(B, in_dim, hidden, out_dim, E, n_residual, head=(), gate_hidden=(), sigmoid=None, *, dtype=torch.float64,
         device="cpu", seed=0):
    """Random (h, expert_params, gate_params) with nn.Linear-like scales."""
    g = torch.Generator().manual_seed(seed + 1000 * B + E)
    sigmoid = (E == 2) if sigmoid is None else sigmoid
    widths = [in_dim, hidden] + [hidden] * n_residual + list(head) + [out_dim]
    u = lambda *s, fan: (torch.rand(*s, generator=g, dtype=torch.float64) * 2 - 1) / fan ** 0.5
    ep = [(u(E, i, o, fan=i), u(E, o, fan=i)) for i, o in zip(widths, widths[1:])]
    gw = [in_dim] + list(gate_hidden) + [1 if sigmoid else E]
    gp = [(u(i, o, fan=i), u(o, fan=i)) for i, o in zip(gw, gw[1:])]
    h = torch.randn(B, in_dim, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(device=device, dtype=dtype)
    return cast(h), [(cast(W), cast(b)) for W, b in ep], [(cast(W), cast(b)) for W, b in gp]


def flat(ep, gp):
    return [W for W, _ in ep] + [b for _, b in ep] + [W for W, _ in gp] + [b for _, b in gp]


def unflat(ts, L):
    G = (len(ts) - 2 * L) // 2
    return list(zip(ts[:L], ts[L:2 * L])), list(zip(ts[2 * L:2 * L + G], ts[2 * L + G:]))


# ----------------------------------------------------------------------------------------------- references
def test_ref_matches_separate_modules():
    """The ref equals E independent nn.Linear stacks and an nn.Linear gate written out by hand."""
    h, ep, gp = make(13, 7, 6, 3, 2, 2, head=(5,), gate_hidden=(4,))
    outs = []
    for e in range(2):
        a = h @ ep[0][0][e] + ep[0][1][e]
        a = a + torch.relu(a) @ ep[1][0][e] + ep[1][1][e]
        a = a + torch.relu(a) @ ep[2][0][e] + ep[2][1][e]
        a = torch.relu(a) @ ep[3][0][e] + ep[3][1][e]
        a = torch.relu(a) @ ep[4][0][e] + ep[4][1][e]
        outs.append(a)
    g = torch.sigmoid(torch.relu(h @ gp[0][0] + gp[0][1]) @ gp[1][0] + gp[1][1])
    want = g * outs[0] + (1 - g) * outs[1]
    out, gate = gated_experts_ref(h, ep, gp, n_residual=2)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-14)
    torch.testing.assert_close(gate, torch.cat([g, 1 - g], 1), rtol=0, atol=1e-15)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_eager_matches_ref_float64(cfg):
    E, nres, head, gh, sig = cfg
    h, ep, gp = make(29, 9, 8, 3, E, nres, head, gh, sig)
    for a, b in zip(gated_experts_eager(h, ep, gp, n_residual=nres), gated_experts_ref(h, ep, gp, n_residual=nres)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("B", [1, 37, 300])
def test_backend_vs_ref(backend, cfg, B):
    E, nres, head, gh, sig = cfg
    dev = _device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    h, ep, gp = make(B, 11, 10, 3, E, nres, head, gh, sig, dtype=dtype, device=dev)
    backend_or_skip(SPEC, backend, {"h": h})
    out, gate = gated_experts(h, ep, gp, n_residual=nres, backend=backend)
    r_out, r_gate = gated_experts_ref(h.double().cpu(), [(W.double().cpu(), b.double().cpu()) for W, b in ep],
                                      [(W.double().cpu(), b.double().cpu()) for W, b in gp], n_residual=nres)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert out.shape == (B, 3) and gate.shape == (B, E)
    torch.testing.assert_close(out.double().cpu(), r_out, rtol=0, atol=tol)
    torch.testing.assert_close(gate.double().cpu(), r_gate, rtol=0, atol=tol)
    torch.testing.assert_close(gate.double().sum(-1).cpu(), torch.ones(B, dtype=torch.float64), rtol=0, atol=tol)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda", "python"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_backward_vs_ref_autograd(backend, cfg):
    """Every gradient (h, every W and b of the experts and the gate) against autograd through the float64 ref, from
    random upstream gradients of both outputs; B=70 spans several row chunks of the CPU kernel."""
    E, nres, head, gh, sig = cfg
    dev = "cpu" if backend == "python" else _device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    B = 70
    h, ep, gp = make(B, 11, 10, 3, E, nres, head, gh, sig, dtype=dtype, device=dev)
    if backend != "python":
        backend_or_skip(SPEC, backend, {"h": h})
    L = len(ep)
    w_out = torch.randn(B, 3, dtype=torch.float64)
    w_gate = torch.randn(B, E, dtype=torch.float64)

    def grads(which, h, ts):
        h = h.detach().clone().requires_grad_()
        ts = [t.detach().clone().requires_grad_() for t in ts]
        if which == "ref":
            e, g = unflat(ts, L)
            out, gate = gated_experts_ref(h, e, g, n_residual=nres)
        else:
            out, gate = GatedExpertsFn.apply(h, nres, L, which, *ts)
        loss = (out.double().cpu() * w_out).sum() + (gate.double().cpu() * w_gate).sum()
        return torch.autograd.grad(loss, [h, *ts])

    got = grads(backend, h, flat(ep, gp))
    exp = grads("ref", h.double().cpu(), [t.double().cpu() for t in flat(ep, gp)])
    tol = 1e-11 if dtype == torch.float64 else 2e-4
    for i, (a, b) in enumerate(zip(got, exp)):
        assert a.shape == b.shape, i
        scale = max(1.0, b.abs().max().item())
        assert (a.double().cpu() - b).abs().max().item() <= tol * scale, f"gradient #{i}"


@pytest.mark.parametrize("backend", ["eager", "cpu", "python"])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[3]])
def test_gradcheck(backend, cfg):
    E, nres, head, gh, sig = cfg
    h, ep, gp = make(6, 4, 3, 2, E, nres, head, gh, sig)
    if backend != "python":
        backend_or_skip(SPEC, backend, {"h": h})
    L = len(ep)
    inputs = (h.clone().requires_grad_(), *[t.clone().requires_grad_() for t in flat(ep, gp)])

    def f(h, *ts):
        if backend == "python":
            return GatedExpertsFn.apply(h, nres, L, "python", *ts)
        e, g = unflat(ts, L)
        return tuple(gated_experts(h, e, g, n_residual=nres, backend=backend))

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_saved_layout_matches_contract(backend):
    """forward returns saved = expert pre-activations (B, E, out_l) then gate pre-activations (B, out_j), equal to
    the plain-PyTorch statement of the contract (the layout the fake kernels and every backward rely on)."""
    dev = _device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    h, ep, gp = make(45, 11, 10, 3, 3, 2, (5,), (4,), dtype=dtype, device=dev)
    backend_or_skip(SPEC, backend, {"h": h})
    args = (h, [W for W, _ in ep], [b for _, b in ep], [W for W, _ in gp], [b for _, b in gp], 2)
    out, gate, saved = _impl(backend).forward(*args)
    out2, gate2, saved2 = ge_module._kernel_forward(*args)
    assert len(saved) == len(saved2) == len(ep) + len(gp)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for s, s2 in zip(saved, saved2):
        assert tuple(s.shape) == tuple(s2.shape)
        torch.testing.assert_close(s.double().cpu(), s2.double().cpu(), rtol=0, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_error_within_2x_ref(backend):
    """A fused float32 result is within 2x the float32 ref's error, both against float64 (DESIGN.md 5)."""
    dev = _device(backend)
    h, ep, gp = make(257, 64, 48, 2, 2, 3, (), (16,))
    exact = gated_experts_ref(h, ep, gp, n_residual=3)
    h32, ep32, gp32 = h.float(), [(W.float(), b.float()) for W, b in ep], [(W.float(), b.float()) for W, b in gp]
    exact = gated_experts_ref(h32.double(), [(W.double(), b.double()) for W, b in ep32],
                              [(W.double(), b.double()) for W, b in gp32], n_residual=3)
    ref32 = gated_experts_ref(h32, ep32, gp32, n_residual=3)
    mv = lambda ps: [(W.to(dev), b.to(dev)) for W, b in ps]
    backend_or_skip(SPEC, backend, {"h": h32.to(dev)})
    got = gated_experts(h32.to(dev), mv(ep32), mv(gp32), n_residual=3, backend=backend)
    for g, r, ex in zip(got, ref32, exact):
        err = (g.double().cpu() - ex).abs().max().item()
        err_ref = (r.double() - ex).abs().max().item()
        assert err <= 2 * err_ref + 1e-6, (err, err_ref)


# ----------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    dev = _device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    h, ep, gp = make(0, 5, 4, 2, 2, 1, (), (3,), dtype=dtype, device=dev)
    backend_or_skip(SPEC, backend, {"h": h})
    L = len(ep)
    ts = [t.clone().requires_grad_() for t in flat(ep, gp)]
    hh = h.clone().requires_grad_()
    e, g = unflat(ts, L)
    out, gate = gated_experts(hh, e, g, n_residual=1, backend=backend)
    assert out.shape == (0, 2) and gate.shape == (0, 2)
    (out.sum() + gate.sum()).backward()
    assert hh.grad.shape == (0, 5)
    for t in ts:
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.abs().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_h(backend):
    dev = _device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    _, ep, gp = make(20, 6, 5, 3, 3, 2, (), (), dtype=dtype, device=dev)
    backend_or_skip(SPEC, backend, {"h": _})
    ht = torch.randn(6, 20, dtype=dtype, device=dev).T  # (20, 6), non-contiguous
    hs = torch.randn(40, 6, dtype=dtype, device=dev)[::2]  # strided rows
    ep_t = [(W.transpose(1, 2).contiguous().transpose(1, 2), b) for W, b in ep]  # non-contiguous weights
    for hh in (ht, hs):
        assert not hh.is_contiguous()
        got = gated_experts(hh, ep_t, gp, n_residual=2, backend=backend)
        want = gated_experts_ref(hh.contiguous().double().cpu(), [(W.double().cpu(), b.double().cpu()) for W, b in ep],
                                 [(W.double().cpu(), b.double().cpu()) for W, b in gp], n_residual=2)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double().cpu(), b, rtol=0, atol=tol)


def test_single_layer_expert_and_extreme_gate():
    """L = 1 (no hidden layer) and huge gate logits: finite, saturated gate."""
    h, ep, gp = make(17, 5, 4, 3, 2, 0)
    ep = ep[:1]
    gp = [(gp[0][0] * 1e4, gp[0][1])]
    for backend in ("eager", "cpu"):
        if dispatch.not_supported_reasons(SPEC, backend, {"h": h}):
            continue
        out, gate = gated_experts(h, ep, gp, n_residual=0, backend=backend)
        ro, rg = gated_experts_ref(h, ep, gp, n_residual=0)
        assert torch.isfinite(out).all() and torch.isfinite(gate).all()
        torch.testing.assert_close(out, ro, rtol=0, atol=1e-12)
        torch.testing.assert_close(gate, rg, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "cpu", "python"])
def test_gradcheck_single_layer_expert(backend):
    h, ep, gp = make(5, 4, 3, 2, 3, 0, (), (3,))
    ep = ep[:1]  # L = 1: out = sum_e gate_e (h W0_e + b0_e)
    if backend != "python":
        backend_or_skip(SPEC, backend, {"h": h})
    inputs = (h.clone().requires_grad_(), *[t.clone().requires_grad_() for t in flat(ep, gp)])

    def f(h, *ts):
        if backend == "python":
            return GatedExpertsFn.apply(h, 0, 1, "python", *ts)
        e, g = unflat(ts, 1)
        return tuple(gated_experts(h, e, g, n_residual=0, backend=backend))

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs_name_the_argument():
    h, ep, gp = make(5, 6, 4, 2, 2, 2, (), (3,))
    W0, b0 = ep[0]
    cases = [
        ((h[0], ep, gp, 2), "h"),
        ((h.long(), ep, gp, 2), "h"),
        ((h[:, :5], ep, gp, 2), r"expert_params\[0\] W"),
        ((h, [(W0, b0[:, :3])] + ep[1:], gp, 2), r"expert_params\[0\] b"),
        ((h, [(W0[0], b0)] + ep[1:], gp, 2), r"expert_params\[0\] W"),
        ((h, ep[:1] + [(ep[1][0][:1], ep[1][1][:1])] + ep[2:], gp, 2), r"expert_params\[1\] W"),
        ((h, ep[:1] + [(ep[1][0][:, :, :3], ep[1][1][:, :3])] + ep[2:], gp, 2), r"expert_params\[1\]"),
        ((h, ep, gp, 5), "n_residual"),
        ((h, ep, gp, -1), "n_residual"),
        ((h, ep, [(gp[0][0][:4], gp[0][1])] + gp[1:], 2), r"gate_params\[0\] W"),
        ((h, ep, gp[:1] + [(gp[1][0][:, :1].repeat(1, 3), gp[1][1].repeat(3))], 2), r"gate_params\[-1\]"),
        ((h, ep, [(gp[0][0].float(), gp[0][1])] + gp[1:], 2), r"gate_params\[0\] W"),
        ((h, [], gp, 0), "expert_params"),
        ((h, ep, [], 2), "gate_params"),
        ((h, [(W0,)] + ep[1:], gp, 2), r"expert_params\[0\]"),
    ]
    for (hh, e, g, nres), name in cases:
        with pytest.raises(ValueError, match=name):
            gated_experts(hh, e, g, n_residual=nres)
    with pytest.raises(ValueError, match="backend"):
        gated_experts(h, ep, gp, n_residual=2, backend="tpu")


def test_forced_unavailable_backend_lists_reasons():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the cuda backend may run")
    h, ep, gp = make(5, 6, 4, 2, 2, 2)
    with pytest.raises(dispatch.BackendUnavailableError, match="cuda backend needs CUDA tensors"):
        gated_experts(h, ep, gp, n_residual=2, backend="cuda")


def test_auto_picks_compiled_cpu_when_built():
    h, ep, gp = make(5, 6, 4, 2, 2, 2)
    expected = "cpu" if not dispatch.not_supported_reasons(SPEC, "cpu", {"h": h}) else "eager"
    assert dispatch.resolve(SPEC, "auto", {"h": h}) == expected


def test_fake_kernels_match_the_cpu_kernel():
    """The fake (meta) kernels registered for torch.compile give the real kernels' output shapes."""
    h, ep, gp = make(9, 6, 4, 2, 3, 1, (5,), (3,), dtype=torch.float32)
    if dispatch.not_supported_reasons(SPEC, "cpu", {"h": h}):
        pytest.skip("compiled cpu kernel unavailable")
    args = (h, [W for W, _ in ep], [b for _, b in ep], [W for W, _ in gp], [b for _, b in gp], 1)
    torch.library.opcheck(torch.ops.moekernels.gated_experts_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    out, gate, saved = torch.ops.moekernels.gated_experts_fwd(*args)
    bargs = (torch.randn_like(out), torch.randn_like(gate), *args[:5], 1, saved, gate)
    torch.library.opcheck(torch.ops.moekernels.gated_experts_bwd.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------- nn module
def test_module_dualdiff_parameter_count():
    """DualDiff's expert (384 -> 256, 3 residual 256 -> 256, relu, 256 -> 2) has 296,450 parameters; two of them
    plus the gate (384 -> 128 -> 1 here, and a linear 384 -> 1 gate) match the analytic count."""
    expert = (384 * 256 + 256) + 3 * (256 * 256 + 256) + (256 * 2 + 2)
    assert expert == 296_450
    m = GatedExperts(384, 256, 2, n_experts=2, n_residual=3, gate_hidden=(128,))
    gate = (384 * 128 + 128) + (128 * 1 + 1)
    assert sum(p.numel() for p in m.parameters()) == 2 * expert + gate
    assert sum(p.numel() for p in m.weights.parameters()) + sum(p.numel() for p in m.biases.parameters()) == 2 * expert
    m0 = GatedExperts(384, 256, 2)
    assert sum(p.numel() for p in m0.parameters()) == 2 * expert + 384 + 1
    # the "extra layer" variant: 256 -> 128 before the 128 -> 2 head
    mx = GatedExperts(384, 256, 2, head=(128,))
    extra = expert - (256 * 2 + 2) + (256 * 128 + 128) + (128 * 2 + 2)
    assert sum(p.numel() for p in mx.parameters()) == 2 * extra + 385


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_module_forward_and_experts(backend):
    m = GatedExperts(12, 10, 3, n_experts=3, n_residual=2, head=(7,), gate_hidden=(5,), backend=backend,
                     dtype=torch.float64)
    h = torch.randn(33, 12, dtype=torch.float64)
    backend_or_skip(SPEC, backend, {"h": h})
    out, gate = m(h)
    ro, rg = gated_experts_ref(h, m.expert_params, m.gate_params, n_residual=2)
    torch.testing.assert_close(out, ro, rtol=0, atol=1e-12)
    torch.testing.assert_close(gate, rg, rtol=0, atol=1e-12)
    out2, gate2, ys = m(h, return_experts=True)
    assert ys.shape == (33, 3, 3)
    torch.testing.assert_close(out2, ro, rtol=0, atol=1e-12)
    torch.testing.assert_close((gate2[:, :, None] * ys).sum(1), ro, rtol=0, atol=1e-12)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_module_init_like_linear_and_sigmoid_default():
    m = GatedExperts(64, 32, 2, n_experts=2)
    assert m.sigmoid_gate and m.gate_weights[-1].shape == (64, 1)
    assert m.weights[0].abs().max() <= 1 / 64 ** 0.5 and m.weights[1].abs().max() <= 1 / 32 ** 0.5
    assert not torch.equal(m.weights[0][0], m.weights[0][1])  # experts initialised independently
    m3 = GatedExperts(8, 6, 2, n_experts=3)
    assert not m3.sigmoid_gate and m3.gate_weights[-1].shape == (8, 3)
    with pytest.raises(ValueError, match="sigmoid_gate"):
        GatedExperts(8, 6, 2, n_experts=3, sigmoid_gate=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3]])
@pytest.mark.parametrize("B", [0, 1, 600])
def test_no_grad_inference_path(backend, cfg, B):
    """Under no_grad the compiled backends may take the inference kernel (no saved activations): same results.
    B=600 spans several row blocks (block buffers reused across blocks and calls)."""
    E, nres, head, gh, sig = cfg
    dev = _device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    h, ep, gp = make(B, 11, 10, 3, E, nres, head, gh, sig, dtype=dtype, device=dev)
    backend_or_skip(SPEC, backend, {"h": h})
    want = gated_experts_ref(h.double().cpu(), [(W.double().cpu(), b.double().cpu()) for W, b in ep],
                             [(W.double().cpu(), b.double().cpu()) for W, b in gp], n_residual=nres)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for _ in range(2):
        with torch.no_grad():
            got = gated_experts(h, ep, gp, n_residual=nres, backend=backend)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double().cpu(), b, rtol=0, atol=tol)


def test_infer_fake_kernel_matches():
    h, ep, gp = make(9, 6, 4, 2, 3, 1, (5,), (3,), dtype=torch.float32)
    if dispatch.not_supported_reasons(SPEC, "cpu", {"h": h}) or not dispatch.has_kernel("gated_experts_infer", "CPU"):
        pytest.skip("compiled cpu inference kernel unavailable")
    args = (h, [W for W, _ in ep], [b for _, b in ep], [W for W, _ in gp], [b for _, b in gp], 1)
    torch.library.opcheck(torch.ops.moekernels.gated_experts_infer.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2]])
def test_param_grads_when_h_needs_no_grad(backend, cfg):
    """h without requires_grad (a fixed embedding): the backends may skip dh (optional kernel); the parameters'
    gradients are unchanged."""
    E, nres, head, gh, sig = cfg
    dev = _device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    h, ep, gp = make(50, 11, 10, 3, E, nres, head, gh, sig, dtype=dtype, device=dev)
    backend_or_skip(SPEC, backend, {"h": h})
    L = len(ep)
    w = torch.randn(50, 3, dtype=dtype, device=dev)

    def grads(h_grad):
        hh = h.clone().requires_grad_(h_grad)
        ts = [t.clone().requires_grad_() for t in flat(ep, gp)]
        e, g = unflat(ts, L)
        out, gate = gated_experts(hh, e, g, n_residual=nres, backend=backend)
        ((out * w).sum() + gate[:, 0].sum()).backward()
        return [t.grad for t in ts], hh.grad

    with_h, dh = grads(True)
    without_h, dh_none = grads(False)
    assert dh is not None and dh_none is None
    for a, b in zip(with_h, without_h):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
