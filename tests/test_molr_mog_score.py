"""molr_mog_score: the ref vs an independent float64 evaluation (full-covariance Gaussians + autograd), every
backend vs the ref (values and gradients), float32 error budget, stability extremes, edge shapes, errors."""
import math

import pytest
import torch

from moekernels.ops import dispatch
from moekernels.ops.molr_mog_score import (
    SPEC, MoLRMoGScoreOutput, molr_mog_score, molr_mog_score_eager, molr_mog_score_ref)
from tests.conftest import backend_or_skip

BACKENDS = ["eager", "cpu", "triton", "cuda"]
F64 = torch.float64


def _device(backend):
    """Where the backend's inputs live; skips CUDA-only backends on a machine without a GPU."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("cuda backend: no CUDA device")
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _dtype(backend):
    """float64 where the backend takes it (the comparisons are then exact to rounding), else float32."""
    return F64 if F64 in SPEC.dtypes[backend] else torch.float32


def make(B, D, K, L, d, *, identity=False, offset=0.0, x_scale=2.0, seed=0, near=False, s=0.8, gamma=0.5):
    """Random float64 inputs with orthonormal expert bases. near=True draws x from the noised model itself
    (x = s A_k z + gamma eps), so the score is O(1/gamma) rather than dominated by -x/gamma^2."""
    g = torch.Generator().manual_seed(seed + 7919 * B + 31 * D + 17 * K + 5 * L + d)
    A = None if identity else torch.linalg.qr(torch.randn(K, D, d, generator=g, dtype=F64))[0]
    mu = torch.randn(K, L, d, generator=g, dtype=F64) + offset
    log_var = torch.randn(K, L, d, generator=g, dtype=F64) * 0.5
    log_pi = torch.randn(K, L, generator=g, dtype=F64)
    if near:
        k = torch.randint(0, K, (B,), generator=g)
        l = torch.randint(0, L, (B,), generator=g)
        z = mu[k, l] + torch.randn(B, d, generator=g, dtype=F64) * (0.5 * log_var[k, l]).exp()
        x0 = z if identity else torch.einsum("bDd,bd->bD", A[k], z)
        x = s * x0 + gamma * torch.randn(B, D, generator=g, dtype=F64)
    else:
        x = torch.randn(B, D, generator=g, dtype=F64) * x_scale + offset
    return x, A, mu, log_var, log_pi


def to(ts, dtype=None, device=None):
    return [None if t is None else t.to(dtype=dtype or t.dtype, device=device or t.device) for t in ts]


def independent(x, s, gamma, A, mu, log_var, log_pi):
    """float64 score, weights and log-density from full-covariance Gaussians (torch.distributions) and autograd:
    x | (k, l) ~ N(s A_k mu_kl, s^2 A_k diag(v_kl) A_k^T + gamma^2 I). No code shared with the op. Scalar s, gamma."""
    B, D = x.shape
    K, L, d = mu.shape
    Ak = torch.eye(D, dtype=x.dtype).expand(K, D, D) if A is None else A
    mean = s * torch.einsum("kDd,kld->klD", Ak, mu)
    cov = s * s * torch.einsum("kDd,kld,kEd->klDE", Ak, log_var.exp(), Ak) + gamma ** 2 * torch.eye(D, dtype=x.dtype)
    comp = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    x = x.detach().clone().requires_grad_()
    l = comp.log_prob(x[:, None, None, :]) + torch.log_softmax(log_pi.reshape(-1), 0).view(K, L)
    lse = torch.logsumexp(l.reshape(B, -1), -1)
    (score,) = torch.autograd.grad(lse.sum(), x)
    return score, torch.softmax(l.reshape(B, -1), -1).view(B, K, L), lse.detach()


def exact_longdouble(x, s, gamma, A, mu, log_var, log_pi):
    """The formula in 80-bit extended precision (numpy longdouble, eps 1e-19), grouping (||z||^2 - ||x||^2) before
    the 1/(2 gamma^2): the "exact" answer for the extremes, where the float64 ref itself cancels 1e14-size terms."""
    import numpy as np

    LD = np.longdouble
    cv = lambda t: None if t is None else np.asarray(t.detach().cpu().double().numpy() if torch.is_tensor(t) else t,
                                                      dtype=LD)
    x, A, mu, lv, lp = (cv(t) for t in (x, A, mu, log_var, log_pi))
    B, D = x.shape
    K, L, d = mu.shape
    s = np.broadcast_to(cv(s).reshape(-1), (B,))[:, None, None, None]
    g2 = np.broadcast_to(cv(gamma).reshape(-1), (B,))[:, None, None, None] ** 2
    lpf = lp.reshape(-1)
    logpi = (lpf - (lpf.max() + np.log(np.exp(lpf - lpf.max()).sum()))).reshape(K, L)
    z = np.broadcast_to(x[:, None, :], (B, K, d)) if A is None else np.einsum("kDd,bD->bkd", A, x)
    e = z[:, :, None, :] - s * mu
    m = s * s * np.exp(lv) + g2
    proj = (z * z).sum(-1) - (x * x).sum(-1)[:, None]
    l = (logpi - 0.5 * (np.log(m) + e * e / m).sum(-1) + proj[:, :, None] / (2 * g2[..., 0])
         - (D - d) / 2 * np.log(g2[..., 0]) - D / 2 * np.log(LD(2) * LD(math.pi)))
    lf = l.reshape(B, -1)
    mx = lf.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(lf - mx).sum(-1, keepdims=True)))[:, 0]
    w = np.exp(l - lse[:, None, None])
    c = (w[..., None] * (z[:, :, None, :] / g2 - e / m)).sum(2)
    score = -x / g2[:, 0, 0] + (c.sum(1) if A is None else np.einsum("kDd,bkd->bD", A, c))
    return tuple(torch.from_numpy(np.asarray(t, dtype=np.float64)) for t in (score, w, lse))


def maxerr(a, b):
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item() if b.numel() else 0.0


# ------------------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("s,gamma", [(0.8, 0.5), (1.0, 0.05), (0.3, 2.0)])
def test_ref_matches_full_covariance_gaussians(identity, s, gamma):
    D, d = (5, 5) if identity else (7, 3)
    args = make(9, D, 3, 2, d, identity=identity, near=True, s=s, gamma=gamma)
    got = molr_mog_score_ref(args[0], s, gamma, *args[1:])
    exp = independent(args[0], s, gamma, *args[1:])
    for a, b in zip(got, exp):
        scale = max(1.0, b.abs().max().item())
        assert maxerr(a, b) <= 1e-10 * scale


def test_ref_per_row_s_gamma_matches_rowwise_independent():
    x, A, mu, lv, lp = make(6, 6, 2, 3, 2, near=True)
    s = torch.rand(6, dtype=F64) * 0.9 + 0.1
    gamma = torch.rand(6, dtype=F64) + 0.1
    got = molr_mog_score_ref(x, s, gamma, A, mu, lv, lp)
    for i in range(6):
        exp = independent(x[i:i + 1], s[i].item(), gamma[i].item(), A, mu, lv, lp)
        for a, b in zip(got, exp):
            assert maxerr(a[i:i + 1], b) <= 1e-10 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("offset,gamma", [(0.0, 0.5), (1e3, 0.5), (0.0, 1e-3)])
def test_eager_matches_ref_float64(identity, offset, gamma):
    D, d = (8, 8) if identity else (13, 4)
    x, A, mu, lv, lp = make(41, D, 3, 4, d, identity=identity, offset=offset, near=True, gamma=gamma)
    for per_row in (False, True):
        g = torch.full((41,), gamma, dtype=F64) * (torch.rand(41, dtype=F64) + 0.5) if per_row else gamma
        got = molr_mog_score_eager(x, 0.8, g, A, mu, lv, lp)
        exp = molr_mog_score_ref(x, 0.8, g, A, mu, lv, lp)
        for a, b in zip(got, exp):
            assert maxerr(a, b) <= 1e-9 * max(1.0, b.abs().max().item())


# ------------------------------------------------------------------------------------------- every backend
# (B, D, K, L, d, identity): odd sizes, K*L = 1, d = D with a square orthogonal A, the identity.
SHAPES = [(1, 5, 1, 1, 3, False), (37, 11, 3, 2, 4, False), (130, 20, 4, 3, 7, False), (29, 9, 1, 1, 9, False),
          (33, 6, 2, 5, 6, True), (70, 17, 3, 4, 17, True), (5, 3, 1, 1, 3, True)]
TRITON_SHAPES = [(1, 5, 1, 1, 3, False), (37, 11, 3, 2, 4, False), (33, 6, 2, 5, 6, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + ("-id" if s[5] else ""))
@pytest.mark.parametrize("per_row", [False, True])
def test_backend_vs_ref(backend, shape, per_row):
    if backend == "triton" and shape not in TRITON_SHAPES:
        pytest.skip("triton: interpreter is slow, tiny shapes only")
    B, D, K, L, d, identity = shape
    dev, dtype = _device(backend), _dtype(backend)
    args = to(make(B, D, K, L, d, identity=identity, near=True), dtype=dtype, device=dev)
    backend_or_skip(SPEC, backend, {"x": args[0]})
    s = (torch.rand(B, dtype=dtype, device=dev) * 0.9 + 0.1) if per_row else 0.8
    gamma = (torch.rand(B, dtype=dtype, device=dev) + 0.2) if per_row else 0.5
    out = molr_mog_score(args[0], s, gamma, *args[1:], return_weights=True, return_lse=True, backend=backend)
    exact = molr_mog_score_ref(*to([args[0]], F64, "cpu"), *(to([s], F64, "cpu") if per_row else [s]),
                               *(to([gamma], F64, "cpu") if per_row else [gamma]), *to(args[1:], F64, "cpu"))
    tol = 1e-10 if dtype == F64 else 3e-5
    for name, a, b in zip(("score", "weights", "lse"), out, exact):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert maxerr(a, b) <= tol * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "offset1e3", "small_gamma", "identity", "identity_offset"])
def test_float32_error_within_2x_ref(backend, case):
    """A fused float32 result (values and gradients) is within 2x the float32 ref's error, both measured against
    float64 evaluated on the same float32-rounded inputs (DESIGN.md 5)."""
    dev = _device(backend)
    identity = case.startswith("identity")
    offset = 1e3 if "offset" in case else 0.0
    gamma = 1e-2 if case == "small_gamma" else 0.3
    B, D, K, L, d = (67, 12, 3, 4, 12) if identity else (67, 24, 3, 4, 5)
    x, A, mu, lv, lp = to(make(B, D, K, L, d, identity=identity, offset=offset, near=True, gamma=gamma), torch.float32)
    backend_or_skip(SPEC, backend, {"x": x.to(dev)})
    s = 0.9
    weights = [torch.randn(B, D, dtype=F64), torch.randn(B, K, L, dtype=F64), torch.randn(B, dtype=F64)]

    def run(fn, ts):
        ts = [None if t is None else t.detach().clone().requires_grad_() for t in ts]
        outs = fn(ts)
        loss = sum((o.double().cpu() * w).sum() for o, w in zip(outs, weights))
        grads = torch.autograd.grad(loss, [t for t in ts if t is not None])
        return [o.detach() for o in outs] + list(grads)

    inputs = [x, A, mu, lv, lp]
    exact = run(lambda ts: molr_mog_score_ref(ts[0], s, gamma, *ts[1:]), to(inputs, F64))
    ref32 = run(lambda ts: molr_mog_score_ref(ts[0], s, gamma, *ts[1:]), inputs)

    def fused(ts):
        o = molr_mog_score(ts[0], s, gamma, *ts[1:], return_weights=True, return_lse=True, backend=backend)
        return o.score, o.weights, o.lse

    got = run(fused, to(inputs, device=dev))
    names = ["score", "weights", "lse", "dx"] + ([] if identity else ["dA"]) + ["dmu", "dlog_var", "dlog_pi"]
    for name, a, r, e in zip(names, got, ref32, exact):
        assert torch.isfinite(a).all(), name
        err, err_ref = maxerr(a, e), maxerr(r, e)
        # 2x the ref's error, plus a few float32 ulps of the value's scale for results the ref gets (nearly) exact
        assert err <= 2 * err_ref + 4e-7 * max(1.0, e.abs().max().item()), (name, err, err_ref)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_gradcheck(backend, identity, per_row):
    D, d = (4, 4) if identity else (7, 3)
    x, A, mu, lv, lp = make(9, D, 3, 2, d, identity=identity, near=True)
    backend_or_skip(SPEC, backend, {"x": x})
    s = torch.rand(9, dtype=F64) * 0.8 + 0.2 if per_row else 0.8
    gamma = torch.rand(9, dtype=F64) + 0.2 if per_row else 0.6
    inputs = [t.clone().requires_grad_() for t in (x, A, mu, lv, lp) if t is not None]

    def f(*ts):
        ts = list(ts)
        if identity:
            ts.insert(1, None)
        o = molr_mog_score(ts[0], s, gamma, *ts[1:], return_weights=True, return_lse=True, backend=backend)
        return o.score, o.weights, o.lse

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("outputs", ["score", "lse", "weights", "all"])
def test_backward_vs_ref_autograd(backend, identity, outputs):
    """Gradients of every input through any combination of the outputs, against autograd through the ref."""
    dev, dtype = _device(backend), _dtype(backend)
    B, D, K, L, d = (23, 6, 2, 3, 6) if identity else (23, 10, 3, 2, 4)
    args = to(make(B, D, K, L, d, identity=identity, near=True), dtype=dtype, device=dev)
    backend_or_skip(SPEC, backend, {"x": args[0]})
    gamma = torch.rand(B, dtype=F64) + 0.2
    wts = [torch.randn(B, D, dtype=F64), torch.randn(B, K, L, dtype=F64), torch.randn(B, dtype=F64)]
    use = {"score": [0], "lse": [2], "weights": [1], "all": [0, 1, 2]}[outputs]

    def grads(which, ts):
        ts = [None if t is None else t.detach().clone().requires_grad_() for t in ts]
        if which == "ref":
            outs = molr_mog_score_ref(ts[0], 0.8, gamma, *ts[1:])
        else:
            o = molr_mog_score(ts[0], 0.8, gamma.to(dtype=dtype, device=dev), *ts[1:], return_weights=1 in use,
                               return_lse=2 in use, backend=which)
            outs = (o.score, o.weights, o.lse) if isinstance(o, MoLRMoGScoreOutput) else (o, None, None)
        loss = sum((outs[i].double().cpu() * wts[i]).sum() for i in use)
        return torch.autograd.grad(loss, [t for t in ts if t is not None])

    got = grads(backend, args)
    exp = grads("ref", to(args, F64, "cpu"))
    tol = 1e-9 if dtype == F64 else 1e-4
    for a, b in zip(got, exp):
        assert maxerr(a, b) <= tol * max(1.0, b.abs().max().item())


# ------------------------------------------------------------------------------------------- stability
EXTREMES = {
    # name: (B, D, K, L, d, identity, x offset, gamma)
    "identity_tiny_gamma_far": (40, 8, 1, 1, 8, True, 1e3, 1e-4),
    "identity_KL_many_tiny_gamma_far": (40, 8, 3, 4, 8, True, 1e3, 1e-4),
    "square_A_KL1_tiny_gamma_far": (40, 8, 1, 1, 8, False, 1e3, 1e-4),
    "lowrank_KL1_tiny_gamma": (40, 12, 1, 1, 3, False, 0.0, 1e-4),
    "lowrank_tiny_gamma_far": (40, 12, 3, 2, 3, False, 1e3, 1e-4),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(EXTREMES))
def test_extremes_finite_and_accurate(backend, case):
    """gamma = 1e-4, s = 1, |x| ~ 1e3, K*L = 1, d = D: finite values and gradients; float64 agrees with the ref,
    float32 within 2x of the float32 ref's error (+ ulps of the scale)."""
    B, D, K, L, d, identity, offset, gamma = EXTREMES[case]
    dev = _device(backend)
    base = make(B, D, K, L, d, identity=identity, offset=offset, near=True, s=1.0, gamma=gamma)
    for dtype in (F64, torch.float32):
        if dtype not in SPEC.dtypes[backend]:
            continue
        args = to(base, dtype)
        backend_or_skip(SPEC, backend, {"x": args[0].to(dev)})
        ts = [None if t is None else t.to(dev).requires_grad_() for t in args]
        o = molr_mog_score(ts[0], 1.0, gamma, *ts[1:], return_weights=True, return_lse=True, backend=backend)
        loss = o.score.double().sum() + o.lse.double().sum() + (o.weights.double() ** 2).sum()
        grads = torch.autograd.grad(loss, [t for t in ts if t is not None])
        for t in (o.score, o.weights, o.lse, *grads):
            assert torch.isfinite(t).all()
        exact = exact_longdouble(args[0], 1.0, gamma, *args[1:])
        ref = molr_mog_score_ref(args[0], 1.0, gamma, *args[1:])  # the ref in the same dtype
        ulp = torch.finfo(dtype).eps
        for name, a, r, e in zip(("score", "weights", "lse"), (o.score, o.weights, o.lse), ref, exact):
            assert maxerr(a, e) <= 2 * maxerr(r, e) + 4 * ulp * max(1.0, e.abs().max().item()), (name, dtype)


def test_identity_tiny_gamma_far_is_accurate_in_float32():
    """The identity path computes -sum w e/m directly: at gamma = 1e-4 and |x| = 1e3 the float32 score is
    accurate to float32 rounding, where the literal formula (-x/gamma^2 + ...) loses everything."""
    x, _, mu, lv, lp = make(50, 6, 2, 2, 6, identity=True, offset=1e3, near=True, s=1.0, gamma=1e-4)
    x32, mu32, lv32, lp32 = to([x, mu, lv, lp], torch.float32)
    exact = exact_longdouble(x32, 1.0, 1e-4, None, mu32, lv32, lp32)[0]
    for backend in ("eager", "cpu"):
        if dispatch.not_supported_reasons(SPEC, backend, {"x": x32}):
            continue
        got = molr_mog_score(x32, 1.0, 1e-4, None, mu32, lv32, lp32, backend=backend)
        assert maxerr(got, exact) <= 1e-5 * exact.abs().max().item(), backend


# ------------------------------------------------------------------------------------------- edges and API
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [0, 1])
@pytest.mark.parametrize("identity", [False, True])
def test_tiny_batches(backend, B, identity):
    dev, dtype = _device(backend), _dtype(backend)
    D, d = (5, 5) if identity else (9, 4)
    args = to(make(B, D, 2, 3, d, identity=identity), dtype=dtype, device=dev)
    backend_or_skip(SPEC, backend, {"x": args[0]})
    ts = [None if t is None else t.requires_grad_() for t in args]
    o = molr_mog_score(ts[0], 0.7, 0.4, *ts[1:], return_weights=True, return_lse=True, backend=backend)
    assert o.score.shape == (B, D) and o.weights.shape == (B, 2, 3) and o.lse.shape == (B,)
    (o.score.sum() + o.lse.sum()).backward()
    for t in ts:
        if t is not None:
            assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()
            if B == 0:
                assert (t.grad == 0).all()
    if B == 1:
        exact = molr_mog_score_ref(*to([args[0]], F64, "cpu"), 0.7, 0.4, *to(args[1:], F64, "cpu"))
        assert maxerr(o.score, exact[0]) <= (1e-10 if dtype == F64 else 3e-5) * max(1.0, exact[0].abs().max().item())


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_non_contiguous_inputs_and_scalar_forms(backend):
    x, A, mu, lv, lp = make(20, 9, 3, 2, 4, near=True)
    backend_or_skip(SPEC, backend, {"x": x})
    exact = molr_mog_score_ref(x, 0.8, 0.5, A, mu, lv, lp)[0]
    xt = x.t().contiguous().t()  # same values, column-major
    At = A.transpose(0, 1).contiguous().transpose(0, 1)
    for s, g in ((0.8, 0.5), (torch.tensor(0.8, dtype=F64), torch.tensor([0.5], dtype=F64)),
                 (torch.full((20,), 0.8, dtype=F64), torch.full((20, 1), 0.5, dtype=F64))):
        got = molr_mog_score(xt, s, g, At, mu, lv, lp, backend=backend)
        assert isinstance(got, torch.Tensor)
        assert maxerr(got, exact) <= 1e-10 * exact.abs().max().item()


def test_return_types():
    x, A, mu, lv, lp = make(4, 6, 2, 2, 3)
    assert isinstance(molr_mog_score(x, 1.0, 0.5, A, mu, lv, lp), torch.Tensor)
    o = molr_mog_score(x, 1.0, 0.5, A, mu, lv, lp, return_lse=True)
    assert isinstance(o, MoLRMoGScoreOutput) and o.weights is None and o.lse.shape == (4,)
    o = molr_mog_score(x, 1.0, 0.5, A, mu, lv, lp, return_weights=True)
    assert o.lse is None and torch.allclose(o.weights.sum((1, 2)), torch.ones(4, dtype=F64))


def test_weights_sum_to_one_and_lse_is_log_density_cpu():
    x, A, mu, lv, lp = to(make(300, 16, 4, 3, 5, near=True), torch.float32)
    backend_or_skip(SPEC, "cpu", {"x": x})
    o = molr_mog_score(x, 0.9, 0.3, A, mu, lv, lp, return_weights=True, return_lse=True, backend="cpu")
    torch.testing.assert_close(o.weights.sum((1, 2)), torch.ones(300), rtol=0, atol=1e-5)
    assert (o.weights >= 0).all()


def _bad_inputs():
    x, A, mu, lv, lp = make(5, 6, 2, 3, 4)
    good = dict(x=x, s=0.5, gamma=0.3, A=A, mu=mu, log_var=lv, log_pi=lp)
    cases = [
        ("x", dict(x=x[0])), ("x", dict(x=x.long())), ("x", dict(x="nope")),
        ("A", dict(A=A[:, :, :3])), ("A", dict(A=A.float())), ("A", dict(A=A[0])),
        ("mu", dict(mu=mu[0])), ("mu", dict(mu=mu.float())),
        ("log_var", dict(log_var=lv[:, :2])), ("log_var", dict(log_var=lv.float())),
        ("log_pi", dict(log_pi=lp.reshape(-1))), ("log_pi", dict(log_pi=lp[:, :2])),
        ("s", dict(s=torch.ones(4, dtype=F64))), ("s", dict(s="x")), ("s", dict(s=float("nan"))),
        ("gamma", dict(gamma=0.0)), ("gamma", dict(gamma=-1.0)), ("gamma", dict(gamma=torch.ones(5, 2, dtype=F64))),
        ("A=None", dict(A=None)),  # D = 6 != d = 4
    ]
    return good, cases


@pytest.mark.parametrize("i", range(len(_bad_inputs()[1])))
def test_bad_inputs_raise_value_error_naming_the_argument(i):
    good, cases = _bad_inputs()
    name, change = cases[i]
    kw = {**good, **change}
    with pytest.raises(ValueError, match=name):
        molr_mog_score(kw["x"], kw["s"], kw["gamma"], kw["A"], kw["mu"], kw["log_var"], kw["log_pi"])


def test_bad_backend_name_and_unavailable_backend():
    x, A, mu, lv, lp = make(3, 6, 2, 2, 3)
    with pytest.raises(ValueError, match="backend"):
        molr_mog_score(x, 1.0, 0.5, A, mu, lv, lp, backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(dispatch.BackendUnavailableError, match="cuda"):
            molr_mog_score(x, 1.0, 0.5, A, mu, lv, lp, backend="cuda")


def test_auto_picks_cpu_kernel_when_built():
    x, A, mu, lv, lp = to(make(3, 6, 2, 2, 3), torch.float32)
    expected = "cpu" if not dispatch.not_supported_reasons(SPEC, "cpu", {"x": x}) else "eager"
    assert dispatch.resolve(SPEC, "auto", {"x": x}) == expected
    # half precision on the CPU: no compiled kernel, eager computes in float32
    xh = x.half()
    assert dispatch.resolve(SPEC, "auto", {"x": xh}) == "eager"
    out = molr_mog_score(xh, 1.0, 0.5, *[t.half() for t in (A, mu, lv, lp)])
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.parametrize("identity", [False, True])
def test_cpu_kernel_deterministic(identity):
    D, d = (8, 8) if identity else (40, 6)
    x, A, mu, lv, lp = to(make(1000, D, 3, 4, d, identity=identity, near=True), torch.float32)
    backend_or_skip(SPEC, "cpu", {"x": x})

    def once():
        ts = [None if t is None else t.clone().requires_grad_() for t in (x, A, mu, lv, lp)]
        o = molr_mog_score(ts[0], 0.9, 0.3, *ts[1:], return_lse=True, backend="cpu")
        (o.score.square().sum() + o.lse.sum()).backward()
        return [o.score] + [t.grad for t in ts if t is not None]

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


def test_cpu_generic_path_matches_simd_path(monkeypatch):
    """MOEKERNELS_CPU_GENERIC=1 forces the header's scalar per-row math; it must agree with the AVX2 path."""
    x, A, mu, lv, lp = to(make(90, 21, 3, 4, 11, near=True), torch.float32)
    backend_or_skip(SPEC, "cpu", {"x": x})
    gamma = torch.rand(90) + 0.2

    def run():
        ts = [t.clone().requires_grad_() for t in (x, A, mu, lv, lp)]
        o = molr_mog_score(ts[0], 0.9, gamma, *ts[1:], return_weights=True, return_lse=True, backend="cpu")
        (o.score.sum() + o.lse.sum() + o.weights[:, 0].sum()).backward()
        return [o.score, o.weights, o.lse] + [t.grad for t in ts]

    a = run()
    monkeypatch.setenv("MOEKERNELS_CPU_GENERIC", "1")
    b = run()
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * max(1.0, v.abs().max().item()))


def test_compiled_op_fake_kernels():
    """The fake (meta) kernels let torch.compile trace the compiled ops (schema + shapes checked by opcheck)."""
    x, A, mu, lv, lp = to(make(7, 9, 2, 3, 4), torch.float32)
    A = A.contiguous()
    if dispatch.not_supported_reasons(SPEC, "cpu", {"x": x}):
        pytest.skip("cpu kernel not built")
    s, g = torch.full((7,), 0.8), torch.full((7,), 0.5)
    logpi = torch.log_softmax(lp.reshape(-1), 0).view(2, 3)
    for A_ in (A, None):
        D = 9 if A_ is not None else 4
        xx = x if A_ is not None else x[:, :4].contiguous()
        args = (xx, s, g, A_, mu, lv, logpi, True)
        torch.library.opcheck(torch.ops.moekernels.molr_mog_score_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        score, lse, w = torch.ops.moekernels.molr_mog_score_fwd(*args)
        bargs = (torch.randn(7, D), torch.randn(7), torch.randn(7, 2, 3), xx, s, g, A_, mu, lv, logpi, lse)
        torch.library.opcheck(torch.ops.moekernels.molr_mog_score_bwd.default, bargs,
                              test_utils=("test_schema", "test_faketensor"))
