"""The mog_posterior CUDA C++ backend on a GPU (skipped, with the reason, where it cannot run).

Compared with mog_posterior_ref: float64 (tight), float32 (2x the float32 ref's error, also 1e3 from the origin),
float16/bfloat16 (upcast accumulation; only output rounding is allowed), gradients against the ref's autograd,
B = 0 and 1, K = 1, many component tiles, non-default streams, determinism. tests/test_cuda_build.py runs the
same kernels on the CPU through an emulator; this file checks them on the hardware (fast-math, real warps).
"""
import pytest
import torch

from moekernels.ops import dispatch
from moekernels.ops.mog_posterior import SPEC, mog_posterior, mog_posterior_ref


_REASON = "; ".join(dispatch.environment_reasons("cuda"))  # empty: the compiled CUDA kernels and a GPU are here
pytestmark = pytest.mark.skipif(bool(_REASON), reason=f"cuda backend unavailable: {_REASON}")


def make(B, D, K, *, dtype=torch.float64, offset=0.0, spread=3.0, iso=False, seed=0):
    g = torch.Generator().manual_seed(seed * 7919 + B * 1000 + D * 10 + K)
    means = torch.randn(K, D, generator=g, dtype=torch.float64) * spread + offset
    comp = torch.randint(0, K, (B,), generator=g)
    x = means[comp] + torch.randn(B, D, generator=g, dtype=torch.float64)
    shape = (K,) if iso else (K, D)
    log_var = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3
    log_pi = torch.randn(K, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, means, log_var, log_pi)]


def cuda(ts):
    return [t.cuda() for t in ts]


def run(ts):
    out = mog_posterior(*ts, backend="cuda")
    return out.log_resp, out.lse, out.assign


SHAPES = [(1, 1, 1), (1, 5, 3), (37, 3, 1), (67, 13, 11), (130, 64, 9), (33, 2, 17), (200, 40, 70),
          (513, 17, 130), (1000, 130, 257)]


@pytest.mark.parametrize("B,D,K", SHAPES)
@pytest.mark.parametrize("iso", [False, True])
def test_float64_matches_ref(B, D, K, iso):
    ts = make(B, D, K, iso=iso)
    lr, lse, assign = run(cuda(ts))
    rlr, rlse, rassign = mog_posterior_ref(*ts)
    assert lr.is_cuda and lr.dtype == torch.float64 and assign.dtype == torch.int64
    torch.testing.assert_close(lr.cpu(), rlr, rtol=0, atol=1e-9)
    torch.testing.assert_close(lse.cpu(), rlse, rtol=1e-12, atol=1e-9)
    assert torch.equal(assign.cpu(), rassign)


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("K", [12, 90])
def test_float32_error_within_2x_ref(offset, K):
    """DESIGN.md 5 for float32, with fast-math exp/log and real FMAs, also for unit clusters 1e3 from the origin."""
    x, m, lv, lp = (t.float() for t in make(257, 16, K, offset=offset, spread=2.0))
    exact = mog_posterior_ref(*(t.double() for t in (x, m, lv, lp)))
    ref32 = mog_posterior_ref(x, m, lv, lp)
    got = run(cuda([x, m, lv, lp]))
    for i in (0, 1):
        err = (got[i].double().cpu() - exact[i]).abs().max().item()
        err_ref = (ref32[i].double() - exact[i]).abs().max().item()
        assert err <= 2 * err_ref + 1e-5, (i, err, err_ref)


def test_far_from_origin_responsibilities_float32():
    x, m, lv, lp = (t.float() for t in make(3000, 8, 40, offset=1e3, spread=2.0))
    exact = mog_posterior_ref(*(t.double() for t in (x, m, lv, lp)))
    lr, lse, assign = run(cuda([x, m, lv, lp]))
    torch.testing.assert_close(lr.exp().double().cpu(), exact[0].exp(), rtol=0, atol=1e-4)
    top2 = exact[0].topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert torch.equal(assign.cpu()[clear], exact[2][clear])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [5, 70])  # 70: two component tiles, raw logits through the float32 scratch
def test_half_inputs_upcast(dtype, K):
    """The kernel op itself on half inputs: it upcasts, accumulates in float32 and only rounds its outputs."""
    x, m, lv, lp = make(300, 12, K, dtype=dtype, spread=1.0)
    logpi = torch.log_softmax(lp.double(), -1).to(dtype)  # what the kernel sees (rounded)
    lr, lse, assign = torch.ops.moekernels.mog_posterior_fwd(*cuda([x, m, lv, logpi]))
    assert lr.dtype == dtype and lse.dtype == dtype and assign.dtype == torch.int64
    # exact on the rounded inputs; the ref renormalises the rounded logpi, the kernel takes it as given
    rlr, rlse, _ = mog_posterior_ref(*(t.double() for t in (x, m, lv, logpi)))
    rlse = rlse + torch.logsumexp(logpi.double(), -1)
    eps = torch.finfo(dtype).eps
    lr, lse = lr.double().cpu(), lse.double().cpu()
    assert ((lr - rlr).abs() <= eps * rlr.abs() + 1e-3).all()
    assert ((lse - rlse).abs() <= eps * rlse.abs() + 1e-3).all()
    torch.testing.assert_close(lr.exp(), rlr.exp(), rtol=0, atol=2 * eps)


def _grads(ts, backend, w_lr, w_lse):
    ts = [t.detach().clone().requires_grad_() for t in ts]
    if backend == "ref":
        lr, lse, _ = mog_posterior_ref(*ts)
    else:
        out = mog_posterior(*ts, backend=backend)
        lr, lse = out.log_resp, out.lse
    loss = (lr.double().cpu() * w_lr).sum() + (lse.double().cpu() * w_lse).sum()
    return torch.autograd.grad(loss, ts)


@pytest.mark.parametrize("B,D,K", [(45, 6, 5), (1, 3, 1), (300, 70, 90), (2000, 5, 3)])
@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_vs_ref_autograd(B, D, K, offset, dtype):
    ts = [t.to(dtype) for t in make(B, D, K, offset=offset, spread=2.0)]
    w_lr, w_lse = torch.randn(B, K, dtype=torch.float64), torch.randn(B, dtype=torch.float64)
    got = _grads(cuda(ts), "cuda", w_lr, w_lse)
    exp = _grads([t.double() for t in ts], "ref", w_lr, w_lse)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    for name, a, b in zip(("x", "means", "log_var", "log_pi"), got, exp):
        assert a.dtype == dtype and a.is_cuda
        scale = max(1.0, b.abs().max().item())
        assert (a.double().cpu() - b).abs().max().item() <= tol * scale, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients(dtype):
    ts = make(200, 10, 7, dtype=dtype, spread=1.0)
    w_lr, w_lse = torch.randn(200, 7, dtype=torch.float64), torch.randn(200, dtype=torch.float64)
    got = _grads(cuda(ts), "cuda", w_lr, w_lse)
    exp = _grads([t.double() for t in ts], "ref", w_lr, w_lse)
    eps = torch.finfo(dtype).eps
    for name, a, b in zip(("x", "means", "log_var", "log_pi"), got, exp):
        scale = max(1.0, b.abs().max().item())
        assert (a.double().cpu() - b).abs().max().item() <= 16 * eps * scale, name


def test_gradcheck_float64():
    ts = [t.cuda().requires_grad_() for t in make(9, 4, 3)]

    def f(*a):
        out = mog_posterior(*a, backend="cuda")
        return out.log_resp, out.lse

    assert torch.autograd.gradcheck(f, ts, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("K", [1, 70])
def test_empty_batch(K):
    x, m, lv, lp = cuda(make(0, 6, K))
    x.requires_grad_()
    m.requires_grad_()
    out = mog_posterior(x, m, lv, lp, backend="cuda")
    assert out.log_resp.shape == (0, K) and out.lse.shape == (0,) and out.assign.shape == (0,)
    out.lse.sum().backward()
    assert x.grad.shape == (0, 6) and torch.equal(m.grad, torch.zeros_like(m))


def test_single_component_is_certain():
    x, m, lv, lp = cuda(make(50, 7, 1))
    lr, lse, assign = run([x, m, lv, lp])
    assert torch.equal(lr, torch.zeros_like(lr)) and torch.equal(assign, torch.zeros_like(assign))
    torch.testing.assert_close(lse.cpu(), mog_posterior_ref(*(t.cpu() for t in (x, m, lv, lp)))[1], rtol=0, atol=1e-10)


def test_deterministic_and_stream_aware():
    ts = cuda(make(5000, 33, 70, dtype=torch.float32))
    w = torch.randn(5000, 70, device="cuda")

    def both():
        a = [t.detach().clone().requires_grad_() for t in ts]
        out = mog_posterior(*a, backend="cuda")
        (out.log_resp * w).sum().add(out.lse.sum()).backward()
        return [out.log_resp.detach(), out.lse.detach(), out.assign] + [t.grad for t in a]

    first = both()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        second = both()
    s.synchronize()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_float16_log_resp_finite_for_far_components():
    x, m, lv, lp = make(20, 64, 3, spread=60.0, dtype=torch.float16)
    lr, lse, _ = run(cuda([x, m, lv, lp]))
    assert torch.isfinite(lr).all() and torch.isfinite(lse).all()


def test_argmax_ties_pick_the_first():
    x, m, lv, lp = make(40, 6, 90)
    m[66], lv[66], lp[66] = m[5], lv[5], lp[5]
    x[:20] = m[5]
    _, _, assign = run(cuda([x, m, lv, lp]))
    assert torch.equal(assign[:20].cpu(), torch.full((20,), 5))


def test_auto_picks_a_gpu_backend():
    x = torch.zeros(3, 2, device="cuda")
    assert dispatch.resolve(SPEC, "auto", {"x": x}) in ("cuda", "triton")
