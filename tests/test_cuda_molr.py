"""CUDA kernels of molr_mog_score (csrc/cuda/molr_mog_score_cuda.cu) against molr_mog_score_ref and its autograd.

GPU-only: every test skips cleanly without a CUDA device or without the compiled CUDA kernel. The kernel-level
tests call torch.ops.moekernels.molr_mog_score_fwd/_bwd through the module-level hooks ``_fwd`` / ``_bwd`` on
``DEVICE`` (so the same checks can drive another implementation of the contract).
"""
import math

import pytest
import torch

from moekernels.ops.molr_mog_score import MoLRMoGScoreFn, molr_mog_score, molr_mog_score_ref

DEVICE = "cuda"


def _fwd(*args):
    return torch.ops.moekernels.molr_mog_score_fwd(*args)


def _bwd(*args):
    return torch.ops.moekernels.molr_mog_score_bwd(*args)


def _require():
    """Skip unless the CUDA kernels can run here (only when DEVICE is cuda)."""
    if DEVICE != "cuda":
        return
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from moekernels import _extension

    if not _extension.available():
        pytest.skip(f"compiled extension unavailable: {_extension.load_error}")
    if not _extension.has_cuda_kernels():
        pytest.skip("moekernels._C was built without CUDA kernels")
    try:
        ok = torch._C._dispatch_has_kernel_for_dispatch_key("moekernels::molr_mog_score_fwd", "CUDA")
    except Exception:
        ok = False
    if not ok:
        pytest.skip("moekernels._C has no CUDA kernel for molr_mog_score (rebuild the extension)")


# ------------------------------------------------------------------------------------------------ inputs
def make(B, D, K, L, d, *, identity=False, offset=0.0, gamma=None, seed=0, dtype=torch.float64, device="cpu"):
    """Random inputs in float64 on the CPU, then cast. A has orthonormal columns; x is drawn near the model
    (a component's mean mapped by A, scaled by s, plus noise) and shifted by `offset`."""
    g = torch.Generator().manual_seed(seed + 7919 * B + 131 * D + 17 * K + 5 * L + d)
    f64 = dict(dtype=torch.float64, generator=g)
    if identity:
        assert D == d
        A = None
    else:
        A = torch.linalg.qr(torch.randn(K, D, d, **f64)).Q  # (K, D, d), orthonormal columns
    mu = torch.randn(K, L, d, **f64) * 2.0
    log_var = torch.randn(K, L, d, **f64) * 0.5
    log_pi = torch.randn(K, L, **f64)
    s = 0.2 + 0.8 * torch.rand(B, **f64)
    gam = (0.1 + torch.rand(B, **f64)) if gamma is None else torch.full((B,), float(gamma), dtype=torch.float64)
    k = torch.randint(0, K, (B,), generator=g)
    l = torch.randint(0, L, (B,), generator=g)
    z = mu[k, l] + torch.randn(B, d, **f64) * (0.5 * log_var[k, l]).exp()
    x0 = z if A is None else torch.einsum("bDd,bd->bD", A[k], z)
    x = s[:, None] * x0 + gam[:, None] * torch.randn(B, D, **f64) + offset
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return dict(x=cast(x), s=cast(s), gamma=cast(gam), A=cast(A), mu=cast(mu), log_var=cast(log_var),
                log_pi=cast(log_pi))


def normalised(inp):
    K, L, _ = inp["mu"].shape
    return torch.log_softmax(inp["log_pi"].reshape(-1), 0).view(K, L)


def to64(inp):
    return {k: (None if v is None else v.detach().to("cpu", torch.float64)) for k, v in inp.items()}


def run_fwd(inp, return_weights=True):
    return _fwd(inp["x"], inp["s"], inp["gamma"], inp["A"], inp["mu"], inp["log_var"], normalised(inp),
                return_weights)


def ref(inp):
    """(score, w, lse) of the float64 ref."""
    i = to64(inp)
    return molr_mog_score_ref(i["x"], i["s"], i["gamma"], i["A"], i["mu"], i["log_var"], i["log_pi"])


def maxerr(a, b):
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item() if b.numel() else 0.0


def score_scale(inp):
    """The natural size of the score's terms, max |x| / gamma^2 (the score is their difference)."""
    i = to64(inp)
    return ((i["x"].abs().amax(1) / i["gamma"] ** 2).max().item()) if i["x"].numel() else 1.0


# Shapes: (B, D, K, L, d, identity). Odd sizes, K*L = 1, d == D with and without A, several tiles per block,
# K*d not a multiple of the 64-column GEMM step, D not a multiple of the 16-deep reduction step.
SHAPES = [
    (1, 1, 1, 1, 1, False),
    (1, 3, 1, 1, 3, True),
    (7, 5, 1, 1, 2, False),  # K*L = 1
    (37, 9, 3, 4, 2, False),
    (33, 6, 5, 3, 6, True),  # identity
    (65, 17, 4, 3, 17, False),  # d == D with an orthogonal A
    (100, 70, 3, 5, 23, False),  # K*d = 69, D = 70: partial GEMM tiles on both sides
    (130, 2, 7, 1, 1, False),  # 2-D toy data
    (64, 40, 2, 2, 40, True),
]


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("B,D,K,L,d,identity", SHAPES)
def test_forward_float64_vs_ref(B, D, K, L, d, identity):
    _require()
    inp = make(B, D, K, L, d, identity=identity, device=DEVICE)
    score, lse, w = run_fwd(inp)
    r_score, r_w, r_lse = ref(inp)
    assert score.shape == (B, D) and lse.shape == (B,) and w.shape == (B, K, L)
    assert score.dtype == lse.dtype == w.dtype == torch.float64
    assert maxerr(score, r_score) <= 1e-10 * score_scale(inp)
    assert maxerr(w, r_w) <= 1e-10
    assert maxerr(lse, r_lse) <= 1e-10 * max(1.0, r_lse.abs().max().item())


def test_forward_without_weights_returns_empty():
    _require()
    inp = make(21, 4, 2, 3, 2, device=DEVICE)
    score, lse, w = run_fwd(inp, return_weights=False)
    assert w.numel() == 0
    r_score, _, r_lse = ref(inp)
    assert maxerr(score, r_score) <= 1e-10 * score_scale(inp)
    assert maxerr(lse, r_lse) <= 1e-10 * max(1.0, r_lse.abs().max().item())


@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("case", ["plain", "far", "tiny_gamma"])
def test_forward_float32_within_2x_ref(identity, case):
    """float32 kernel error <= 2x the float32 ref's error (both against float64 on the same rounded inputs),
    plus a few float32 ulps of the terms' natural size."""
    _require()
    B, D, K, L, d = (257, 24, 4, 3, 24) if identity else (257, 24, 4, 3, 5)
    kw = dict(offset=1e3) if case == "far" else dict(gamma=1e-4) if case == "tiny_gamma" else {}
    inp32 = make(B, D, K, L, d, identity=identity, dtype=torch.float32, device=DEVICE, **kw)
    score, lse, w = run_fwd(inp32)
    ex_score, ex_w, ex_lse = ref(inp32)  # float64 on the float32-rounded inputs
    i32 = {k: (None if v is None else v.cpu()) for k, v in inp32.items()}
    r_score, r_w, r_lse = molr_mog_score_ref(i32["x"], i32["s"], i32["gamma"], i32["A"], i32["mu"],
                                             i32["log_var"], i32["log_pi"])
    for name, got, r32, ex, scale in (("score", score, r_score, ex_score, score_scale(inp32)),
                                      ("w", w, r_w, ex_w, 1.0),
                                      ("lse", lse, r_lse, ex_lse, ex_lse.abs().max().item())):
        assert torch.isfinite(got).all(), name
        err, err_ref = maxerr(got, ex), maxerr(r32, ex)
        assert err <= 2 * err_ref + 1e-5 * scale, (name, err, err_ref, scale)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("identity", [False, True])
def test_forward_half_precision(dtype, tol, identity):
    """fp16/bf16 in and out, fp32 inside: errors of the order of the output rounding (against float64 on the
    same rounded inputs)."""
    _require()
    B, D, K, L, d = (150, 12, 3, 2, 12) if identity else (150, 12, 3, 2, 4)
    inp = make(B, D, K, L, d, identity=identity, dtype=dtype, device=DEVICE)
    score, lse, w = run_fwd(inp)
    assert score.dtype == lse.dtype == w.dtype == dtype
    ex_score, ex_w, ex_lse = ref(inp)
    assert maxerr(score, ex_score) <= tol * max(1.0, ex_score.abs().max().item())
    assert maxerr(w, ex_w) <= tol
    assert maxerr(lse, ex_lse) <= tol * max(1.0, ex_lse.abs().max().item())


def test_forward_large_latent_uses_global_scratch():
    """K*d = 2048 columns: the float32 row tile (32 x 2049 + 32 x 8 floats, 262 KB) exceeds any GPU's shared
    memory, so the kernel keeps it in global scratch; the results must not change."""
    _require()
    inp = make(70, 512, 4, 2, 512, device=DEVICE)
    score, lse, w = run_fwd(inp)
    r_score, r_w, r_lse = ref(inp)
    assert maxerr(score, r_score) <= 1e-9 * score_scale(inp)
    assert maxerr(w, r_w) <= 1e-9
    assert maxerr(lse, r_lse) <= 1e-10 * max(1.0, r_lse.abs().max().item())


def test_forward_many_tiles_per_block():
    """More rows than resident blocks x 32: the persistent blocks loop over several tiles."""
    _require()
    inp = make(40000, 6, 3, 2, 2, device=DEVICE)
    score, lse, w = run_fwd(inp)
    r_score, r_w, r_lse = ref(inp)
    assert maxerr(score, r_score) <= 1e-10 * score_scale(inp)
    assert maxerr(w, r_w) <= 1e-10
    assert maxerr(lse, r_lse) <= 1e-10 * max(1.0, r_lse.abs().max().item())


# ------------------------------------------------------------------------------------------------ backward
def ref_grads(inp, G, g_lse, g_w):
    """Gradients of sum(G score) + sum(g_lse lse) (+ sum(g_w w)) by autograd through the float64 ref, w.r.t.
    x, A, mu, log_var and the unnormalised log_pi."""
    i = to64(inp)
    leaves = {k: (None if i[k] is None else i[k].clone().requires_grad_()) for k in ("x", "A", "mu", "log_var",
                                                                                      "log_pi")}
    score, w, lse = molr_mog_score_ref(leaves["x"], i["s"], i["gamma"], leaves["A"], leaves["mu"],
                                       leaves["log_var"], leaves["log_pi"])
    loss = (score * G.double().cpu()).sum() + (lse * g_lse.double().cpu()).sum()
    if g_w is not None:
        loss = loss + (w * g_w.double().cpu()).sum()
    names = [k for k, v in leaves.items() if v is not None]
    out = dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))
    out.setdefault("A", None)
    return out


def run_bwd(inp, G, g_lse, g_w):
    """The kernel's gradients; dlogpi (w.r.t. the normalised logpi the kernel sees) is also taken through the
    log_softmax to the unnormalised log_pi, as the autograd Function's caller does: g - pi * sum(g)."""
    lse = run_fwd(inp, return_weights=False)[1]
    dx, dA, dmu, dlv, dlogpi = _bwd(G, g_lse, g_w, inp["x"], inp["s"], inp["gamma"], inp["A"], inp["mu"],
                                    inp["log_var"], normalised(inp), lse)
    pi = normalised(to64(inp)).exp()
    d = dlogpi.double().cpu()
    return {"x": dx, "A": dA, "mu": dmu, "log_var": dlv, "logpi": dlogpi, "log_pi": d - pi * d.sum()}


def upstream(inp, with_gw, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, D = inp["x"].shape
    K, L, _ = inp["mu"].shape
    dev, dt = inp["x"].device, inp["x"].dtype
    G = torch.randn(B, D, generator=g, dtype=torch.float64).to(dev, dt)
    g_lse = torch.randn(B, generator=g, dtype=torch.float64).to(dev, dt)
    g_w = torch.randn(B, K, L, generator=g, dtype=torch.float64).to(dev, dt) if with_gw else None
    return G, g_lse, g_w


def check_grads(got, exp, inp, g_lse, rtol):
    assert (got["A"] is None) == (inp["A"] is None)
    for name in ("x", "A", "mu", "log_var", "log_pi"):
        if exp[name] is None:
            continue
        g = got[name]
        assert g.shape == exp[name].shape, name
        assert torch.isfinite(g).all(), name
        scale = max(1.0, exp[name].abs().max().item())
        err = maxerr(g, exp[name])
        assert err <= rtol * scale, (name, err, scale)
    # the part of dlogpi the log_softmax removes: sum_kl dl_kl = g_lse for every row
    dl = got["logpi"]
    assert dl.dtype == got["x"].dtype == inp["x"].dtype and dl.shape == inp["log_pi"].shape
    tot = g_lse.double().sum().item()
    assert abs(dl.double().sum().item() - tot) <= rtol * max(1.0, g_lse.double().abs().sum().item())


@pytest.mark.parametrize("B,D,K,L,d,identity", SHAPES)
@pytest.mark.parametrize("with_gw", [False, True])
def test_backward_float64_vs_ref_autograd(B, D, K, L, d, identity, with_gw):
    _require()
    inp = make(B, D, K, L, d, identity=identity, device=DEVICE)
    G, g_lse, g_w = upstream(inp, with_gw)
    check_grads(run_bwd(inp, G, g_lse, g_w), ref_grads(inp, G, g_lse, g_w), inp, g_lse, rtol=1e-9)


@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("case", ["tiny_gamma", "far"])
def test_backward_tiny_gamma_and_far_data_float64(identity, case):
    """gamma = 1e-4: the logits carry (||z||^2 - ||x||^2) / (2 gamma^2), whose float64 rounding (~1e-16 ||x||^2
    / gamma^2, formed differently by the kernel and the ref) reaches the gradients multiplied by dw ~ |G| |x| /
    gamma^2 -- both sides are only that accurate, hence the looser tolerance there."""
    _require()
    D, d = (6, 6) if identity else (9, 3)
    kw, rtol = (dict(gamma=1e-4), 1e-5) if case == "tiny_gamma" else (dict(offset=1e3), 1e-7)
    inp = make(45, D, 3, 2, d, identity=identity, device=DEVICE, **kw)
    G, g_lse, g_w = upstream(inp, True)
    check_grads(run_bwd(inp, G, g_lse, g_w), ref_grads(inp, G, g_lse, g_w), inp, g_lse, rtol=rtol)


def test_backward_large_latent_and_many_tiles():
    _require()
    for shape in ((70, 512, 4, 2, 512), (40000, 6, 3, 2, 2)):
        inp = make(*shape, device=DEVICE)
        G, g_lse, g_w = upstream(inp, True)
        check_grads(run_bwd(inp, G, g_lse, g_w), ref_grads(inp, G, g_lse, g_w), inp, g_lse, rtol=1e-9)


@pytest.mark.parametrize("identity", [False, True])
def test_backward_float32(identity):
    _require()
    D, d = (10, 10) if identity else (10, 4)
    inp = make(97, D, 3, 3, d, identity=identity, dtype=torch.float32, device=DEVICE)
    G, g_lse, g_w = upstream(inp, True)
    check_grads(run_bwd(inp, G, g_lse, g_w), ref_grads(inp, G, g_lse, g_w), inp, g_lse, rtol=2e-4)


@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("case", ["plain", "far", "gamma_1e-2", "tiny_gamma"])
def test_backward_float32_within_2x_ref(identity, case):
    """float32 gradients: error <= 2x the float32 ref autograd's error (both against float64 on the same
    rounded inputs), plus a few float32 ulps of each gradient's size."""
    _require()
    D, d = (12, 12) if identity else (12, 4)
    kw = {"plain": {}, "far": dict(offset=1e3), "gamma_1e-2": dict(gamma=1e-2), "tiny_gamma": dict(gamma=1e-4)}[case]
    inp = make(97, D, 3, 3, d, identity=identity, dtype=torch.float32, device=DEVICE, **kw)
    G, g_lse, g_w = upstream(inp, True)
    got = run_bwd(inp, G, g_lse, g_w)
    exact = ref_grads(inp, G, g_lse, g_w)  # float64 on the float32-rounded inputs
    i32 = {k: (None if v is None else v.detach().cpu().clone().requires_grad_()) for k, v in inp.items()}
    names = [k for k in ("x", "A", "mu", "log_var", "log_pi") if i32[k] is not None]
    score, w, lse = molr_mog_score_ref(i32["x"], i32["s"].detach(), i32["gamma"].detach(), i32["A"], i32["mu"],
                                       i32["log_var"], i32["log_pi"])
    loss = (score * G.cpu()).sum() + (lse * g_lse.cpu()).sum() + (w * g_w.cpu()).sum()
    r32 = dict(zip(names, torch.autograd.grad(loss, [i32[k] for k in names])))
    for name in names:
        assert torch.isfinite(got[name]).all(), name
        err, err_ref = maxerr(got[name], exact[name]), maxerr(r32[name], exact[name])
        scale = exact[name].abs().max().item()
        assert err <= 2 * err_ref + 1e-5 * scale, (name, err, err_ref, scale)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("identity", [False, True])
def test_backward_half_precision(dtype, tol, identity):
    _require()
    D, d = (8, 8) if identity else (8, 3)
    inp = make(64, D, 2, 3, d, identity=identity, dtype=dtype, device=DEVICE)
    G, g_lse, g_w = upstream(inp, True)
    check_grads(run_bwd(inp, G, g_lse, g_w), ref_grads(inp, G, g_lse, g_w), inp, g_lse, rtol=tol)


def test_empty_batch():
    _require()
    inp = make(5, 4, 2, 3, 2, device=DEVICE)
    inp["x"], inp["s"], inp["gamma"] = inp["x"][:0], inp["s"][:0], inp["gamma"][:0]
    score, lse, w = run_fwd(inp)
    assert score.shape == (0, 4) and lse.shape == (0,) and w.shape == (0, 2, 3)
    G, g_lse, g_w = upstream(inp, True)
    got = run_bwd(inp, G, g_lse, g_w)
    assert got["x"].shape == (0, 4)
    for name in ("A", "mu", "log_var", "logpi"):
        assert got[name].shape == (inp[name].shape if name != "logpi" else (2, 3)) and (got[name] == 0).all()


# ------------------------------------------------------------------------------------------------ autograd
@pytest.mark.parametrize("identity", [False, True])
def test_gradcheck_through_the_autograd_function(identity):
    """torch.autograd.gradcheck of MoLRMoGScoreFn on the cuda kernels (score, w and lse all used)."""
    _require()
    D, d = (3, 3) if identity else (4, 2)
    inp = make(5, D, 2, 2, d, identity=identity, device=DEVICE)
    s, gam = inp["s"], inp["gamma"]
    names = ["x", "mu", "log_var", "log_pi"] + ([] if identity else ["A"])
    leaves = tuple(inp[n].clone().requires_grad_() for n in names)

    def f(*ts):
        t = dict(zip(names, ts))
        K, L, _ = t["mu"].shape
        logpi = torch.log_softmax(t["log_pi"].reshape(-1), 0).view(K, L)
        score, lse, w = MoLRMoGScoreFn.apply(t["x"], s, gam, t.get("A"), t["mu"], t["log_var"], logpi, True, "cuda")
        return score, lse, w

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_public_op_cuda_backend_matches_eager():
    _require()
    if DEVICE != "cuda":
        pytest.skip("public-op dispatch needs CUDA tensors")
    inp = make(50, 7, 3, 2, 3, device="cuda")
    args = (inp["x"], inp["s"], inp["gamma"], inp["A"], inp["mu"], inp["log_var"], inp["log_pi"])
    a = molr_mog_score(*args, return_weights=True, return_lse=True, backend="cuda")
    b = molr_mog_score(*args, return_weights=True, return_lse=True, backend="eager")
    assert maxerr(a.score, b.score) <= 1e-10 * score_scale(inp)
    assert maxerr(a.weights, b.weights) <= 1e-10
    assert maxerr(a.lse, b.lse) <= 1e-10 * max(1.0, b.lse.abs().max().item())


def test_scalar_constants_are_finite_for_extreme_rows():
    """Rows far off every subspace with tiny gamma: logits ~ -1e12, still finite outputs in float32."""
    _require()
    inp = make(40, 8, 3, 2, 2, gamma=1e-4, offset=1e3, dtype=torch.float32, device=DEVICE)
    score, lse, w = run_fwd(inp)
    assert torch.isfinite(score).all() and torch.isfinite(lse).all() and torch.isfinite(w).all()
    assert torch.allclose(w.double().sum((1, 2)), torch.ones(40, dtype=torch.float64, device=w.device), atol=1e-5)
    G, g_lse, g_w = upstream(inp, True)
    got = run_bwd(inp, G, g_lse, g_w)
    for name in ("x", "A", "mu", "log_var", "logpi"):
        assert torch.isfinite(got[name]).all(), name
    assert math.isfinite(lse.double().sum().item())
