"""Triton kernels: the ahead-of-time compile check (tools/triton_aot_check.py, sm_90, no GPU needed) per kernel
module, and the mog_posterior Triton paths that tests/test_mog_posterior.py does not reach (several K blocks,
several row blocks per backward program, float64, determinism). Runs in the interpreter without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "triton_aot_check.py"
TRITON_DIR = ROOT / "moekernels" / "ops" / "triton"
MODULES = sorted(p.stem for p in TRITON_DIR.glob("*.py") if not p.stem.startswith("_"))

triton = pytest.importorskip("triton")


def _run_tool(*args, timeout=600):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the tool needs real JITFunctions (it also drops the variable itself)
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_every_kernel_has_aot_specs():
    r = _run_tool("--list")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "_mog_posterior_fwd_kernel" in r.stdout and "_mog_posterior_bwd_kernel" in r.stdout


@pytest.mark.parametrize("module", MODULES)
def test_aot_compile_sm90(module):
    """First AOT spec of each kernel of ``module`` compiles for sm_90 (the full matrix: tools/triton_aot_check.py)."""
    r = _run_tool("--quick", "--arch", "90", "--module", module)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "OK" in r.stdout


def test_aot_check_reports_a_broken_kernel(tmp_path):
    """The check fails (exit 1, FAILED line) on a kernel that does not compile."""
    src = tmp_path / "broken.py"
    src.write_text(
        "import sys\nsys.path.insert(0, %r)\n" % str(ROOT)
        + "import triton, triton.language as tl\n"
        "@triton.jit\n"
        "def _broken_kernel(X, BLOCK: tl.constexpr):\n"
        "    x = tl.load(X + tl.arange(0, BLOCK))\n"
        "    tl.store(X + tl.arange(0, BLOCK), x + undefined_name)\n"
        "import tools.triton_aot_check as t\n"
        "spec = ('broken', _broken_kernel, {'X': '*fp32'}, {'BLOCK': 16}, {})\n"
        "ok, dt, detail = t.compile_one(spec, 90)\n"
        "print('RESULT', ok, detail)\n"
        "good = ('good', _broken_kernel, {'X': '*fp32'}, {'BLOCK': 12}, {})\n"  # non-power-of-2 arange
        "print('RESULT2', t.compile_one(good, 90)[0])\n")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(src)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "RESULT False" in r.stdout, r.stdout + r.stderr
    assert "RESULT2 False" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------------------------ mog_posterior triton paths
def _device():
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    return "cpu"


def _inputs(B, D, K, dtype, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=g, dtype=torch.float64) * 2.0 + offset
    x = means[torch.randint(0, K, (B,), generator=g)] + torch.randn(B, D, generator=g, dtype=torch.float64)
    log_var = torch.randn(K, D, generator=g, dtype=torch.float64) * 0.3
    logpi = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), -1)
    return [t.to(_device(), dtype) for t in (x, means, log_var, logpi)]


def _logits64(x, means, log_var, logpi):
    diff = x[:, None, :] - means[None]
    return logpi - 0.5 * (torch.log(torch.tensor(2 * torch.pi, dtype=x.dtype)) + log_var + diff ** 2 / log_var.exp()).sum(-1)


def _check_fwd_bwd(tri, B, D, K, dtype, tol_f, tol_b, offset=0.0):
    x, m, lv, lp = _inputs(B, D, K, dtype, offset)
    lr, lse, assign = tri.forward(x, m, lv, lp)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, m, lv, lp)]
    l = _logits64(*leaves)
    lse64 = torch.logsumexp(l, -1)
    torch.testing.assert_close(lr.cpu().double(), (l - lse64[:, None]).detach(), rtol=0, atol=tol_f)
    torch.testing.assert_close(lse.cpu().double(), lse64.detach(), rtol=0, atol=tol_f)
    assert torch.equal(assign.cpu(), l.argmax(-1))
    glr, glse = torch.randn(B, K, dtype=torch.float64), torch.randn(B, dtype=torch.float64)
    exp = torch.autograd.grad(((l - lse64[:, None]) * glr).sum() + (lse64 * glse).sum(), leaves)
    got = tri.backward(glr.to(x), glse.to(x), x, m, lv, lr)
    for name, a, b in zip(("dx", "dmeans", "dlog_var", "dlogpi"), got, exp):
        assert a.shape == b.shape and a.dtype == x.dtype, name
        assert (a.cpu().double() - b).abs().max().item() <= tol_b * max(1.0, b.abs().max().item()), name
    return got


@pytest.mark.parametrize("dtype,tol_f,tol_b", [(torch.float64, 1e-10, 1e-12), (torch.float32, 2e-3, 1e-5)])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_mog_posterior_several_k_blocks(monkeypatch, dtype, tol_f, tol_b, offset):
    """K spread over several K blocks (online logsumexp + second pass; dx accumulated over K blocks) and more row
    blocks than backward programs (grid-stride loop)."""
    from moekernels.ops.triton import mog_posterior as tri

    if _device() == "cpu":
        monkeypatch.setattr(tri, "_INTERP_MAX_BLOCK_K", 4)
        monkeypatch.setattr(tri, "_INTERP_TILE", 1024)
    _check_fwd_bwd(tri, 203, 5, 11, dtype, tol_f, tol_b, offset)
    _check_fwd_bwd(tri, 7, 3, 64 + 9, dtype, tol_f, tol_b, offset)


@pytest.mark.parametrize("dtype,tol_f", [(torch.float16, 0.5), (torch.bfloat16, 4.0)])
def test_mog_posterior_half_inputs(dtype, tol_f):
    """fp16 / bf16 in and out, float32 inside: errors are the output rounding (|log_resp| up to a few hundred)."""
    from moekernels.ops.triton import mog_posterior as tri

    _check_fwd_bwd(tri, 37, 6, 5, dtype, tol_f, 2e-2)


def test_mog_posterior_backward_is_deterministic():
    from moekernels.ops.triton import mog_posterior as tri

    x, m, lv, lp = _inputs(300, 7, 6, torch.float32)
    lr, _, _ = tri.forward(x, m, lv, lp)
    glr, glse = torch.randn_like(lr), torch.randn_like(lr[:, 0])
    a = tri.backward(glr, glse, x, m, lv, lr)
    b = tri.backward(glr, glse, x, m, lv, lr)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_mog_posterior_triton_gradcheck_float64():
    """The triton backend's autograd Function in float64 (the dispatcher offers triton for fp16/bf16/fp32)."""
    from moekernels.ops.mog_posterior import MoGPosteriorFn

    x, m, lv, lp = _inputs(9, 4, 3, torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (x, m, lv, lp))

    def f(*a):
        lr, lse, _ = MoGPosteriorFn.apply(*a, "triton")
        return lr, lse

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)
