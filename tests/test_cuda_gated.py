"""CUDA (csrc/cuda/gated_experts_*) and GPU-Triton (moekernels/ops/triton/gated_experts.py) kernels of gated_experts
against the plain-PyTorch statement of the kernel contract (moekernels.ops.gated_experts._kernel_forward /
_kernel_backward) in float64, and the public op's autograd against gated_experts_ref.

* GPU tests: skip cleanly without a CUDA device (and, for "cuda", without the compiled CUDA kernels).
* Triton-interpreter tests (no GPU: TRITON_INTERPRET=1 from tests/conftest.py) of the same checks; they skip on a
  GPU machine, where the GPU tests run the compiled Triton kernels.
* Emulator tests (no GPU needed): the *actual* kernel source csrc/cuda/gated_experts_cuda.cu compiled for the CPU
  emulator of tests/cuda_emu (emu.h: threads as fibers, __syncthreads / warp shuffles honoured), driven by a
  Python mirror of the layer loop of gated_experts_bind.cpp. They skip without g++ or the CUDA headers.
"""
import ctypes
import importlib
import shutil
import subprocess

import pytest
import torch

ge = importlib.import_module("moekernels.ops.gated_experts")

# (B, in, hidden, out, E, n_residual, head widths, gate hidden widths, sigmoid gate when E == 2)
SHAPES = [
    (37, 19, 24, 3, 2, 2, (), (7,), True),  # DualDiff-like, odd sizes
    (37, 19, 24, 3, 3, 1, (11,), (), True),  # extra head layer, softmax over 3, one-layer gate
    (5, 8, 16, 2, 2, 0, (), (5, 6), False),  # E = 2 with a softmax gate, no residual
    (1, 4, 4, 4, 1, 1, (), (), True),  # B = 1, one expert
    (33, 6, 6, 6, 2, 2, (), (9,), True),  # the last layer is a residual block (hidden == out)
    (70, 33, 80, 2, 4, 3, (), (40,), True),  # several row / column tiles, K spans several chunks
]


def make(B, IN, hid, out, E, nres, head=(), gate_hidden=(), sig=True, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * B + IN)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * (1.0 / max(s[-2], 1) ** 0.5 if len(s) > 1 else 0.3)
    h = torch.randn(B, IN, generator=g, dtype=torch.float64)
    widths = [IN, hid] + [hid] * nres + list(head) + [out]
    Ws = [r(E, widths[i], widths[i + 1]) for i in range(len(widths) - 1)]
    bs = [torch.randn(E, widths[i + 1], generator=g, dtype=torch.float64) * 0.3 for i in range(len(widths) - 1)]
    gw = [IN] + list(gate_hidden) + [1 if (sig and E == 2) else E]
    gWs = [r(gw[i], gw[i + 1]) for i in range(len(gw) - 1)]
    gbs = [torch.randn(gw[i + 1], generator=g, dtype=torch.float64) * 0.3 for i in range(len(gw) - 1)]
    cast = lambda t: t.to(device=device, dtype=dtype).contiguous()
    return cast(h), [cast(t) for t in Ws], [cast(t) for t in bs], [cast(t) for t in gWs], [cast(t) for t in gbs]


def upstream(B, O, E, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, O, generator=g, dtype=torch.float64), torch.randn(B, E, generator=g, dtype=torch.float64)


def rel(a, b):
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


def flat(res):
    dh, dWs, dbs, dgWs, dgbs = res
    return [dh, *dWs, *dbs, *dgWs, *dgbs]


def c64(ts):
    return [t.detach().to("cpu", torch.float64) for t in ts]


def reference(h, Ws, bs, gWs, gbs, nres, g_out, g_gate):
    """float64 CPU: (out, gate, saved, grads) of the contract."""
    h64, W64, b64, gW64, gb64 = h.detach().to("cpu", torch.float64), c64(Ws), c64(bs), c64(gWs), c64(gbs)
    out, gate, saved = ge._kernel_forward(h64, W64, b64, gW64, gb64, nres)
    grads = ge._kernel_backward(g_out, g_gate, h64, W64, b64, gW64, gb64, nres, saved, gate)
    return out, gate, saved, grads


def check_impl(impl, shape, dtype, device, tol):
    B, IN, hid, O, E, nres, head, gh, sig = shape
    h, Ws, bs, gWs, gbs = make(B, IN, hid, O, E, nres, head, gh, sig, dtype=dtype, device=device)
    g_out, g_gate = upstream(B, O, E)
    out, gate, saved = impl.forward(h, Ws, bs, gWs, gbs, nres)
    assert out.shape == (B, O) and gate.shape == (B, E) and out.dtype == dtype
    L = len(Ws)
    assert [tuple(s.shape) for s in saved] == [(B, E, W.shape[2]) for W in Ws] + [(B, W.shape[1]) for W in gWs]
    ro, rg, rs, rgrads = reference(h, Ws, bs, gWs, gbs, nres, g_out, g_gate)
    assert rel(out, ro) < tol and rel(gate, rg) < tol, (rel(out, ro), rel(gate, rg))
    for l, (s, r) in enumerate(zip(saved, rs)):
        assert rel(s, r) < tol, (l, rel(s, r))
    grads = impl.backward(g_out.to(device, dtype), g_gate.to(device, dtype), h, Ws, bs, gWs, gbs, nres, saved, gate)
    got, want = flat(grads), flat(rgrads)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == dtype, (i, a.shape, b.shape, a.dtype)
        assert torch.isfinite(a).all()
        assert rel(a, b) < tol, (i, rel(a, b))
    assert L == len(grads[1])


# ------------------------------------------------------------------------------------------------ GPU
def _require_gpu(backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "triton":
        pytest.importorskip("triton")
        return
    from moekernels import _extension

    if not _extension.available():
        pytest.skip(f"compiled extension unavailable: {_extension.load_error}")
    if not _extension.has_cuda_kernels():
        pytest.skip("moekernels._C was built without CUDA kernels")
    try:
        ok = torch._C._dispatch_has_kernel_for_dispatch_key("moekernels::gated_experts_fwd", "CUDA")
    except Exception:
        ok = False
    if not ok:
        pytest.skip("moekernels._C has no CUDA kernel for gated_experts (rebuild the extension)")


def _gpu_impl(backend):
    if backend == "triton":
        from moekernels.ops.triton import gated_experts as tri

        return tri
    return ge._TorchOpsImpl


GPU_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 3e-2, torch.bfloat16: 2e-1}


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gpu_kernels_vs_contract(backend, shape, dtype):
    _require_gpu(backend)
    check_impl(_gpu_impl(backend), shape, dtype, "cuda", GPU_TOL[dtype])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_half_forward(backend, dtype):
    """Half inputs (fp32 accumulation): forward within the half rounding of the activations."""
    _require_gpu(backend)
    B, IN, hid, O, E, nres = 300, 48, 64, 2, 2, 3
    h, Ws, bs, gWs, gbs = make(B, IN, hid, O, E, nres, (), (32,), True, dtype=dtype, device="cuda")
    out, gate, saved = _gpu_impl(backend).forward(h, Ws, bs, gWs, gbs, nres)
    ro, rg, _, _ = reference(h, Ws, bs, gWs, gbs, nres, *upstream(B, O, E))
    assert rel(out, ro) < GPU_TOL[dtype] and rel(gate, rg) < GPU_TOL[dtype]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_dualdiff_shape_and_autograd(backend):
    """The DualDiff net (384 -> 256, 3 residual blocks, 256 -> 2; gate 384 -> 128 -> 1) through the public op:
    output and every gradient against gated_experts_ref in float64 autograd."""
    _require_gpu(backend)
    B, IN, hid, O, E, nres = 1000, 384, 256, 2, 2, 3
    h, Ws, bs, gWs, gbs = make(B, IN, hid, O, E, nres, (), (128,), True, dtype=torch.float32, device="cuda")
    leaves = [t.clone().requires_grad_() for t in [h, *Ws, *bs, *gWs, *gbs]]
    L, J = len(Ws), len(gWs)
    hh, W_, b_, gW_, gb_ = leaves[0], leaves[1:1 + L], leaves[1 + L:1 + 2 * L], leaves[1 + 2 * L:1 + 2 * L + J], \
        leaves[1 + 2 * L + J:]
    out, gate = ge.gated_experts(hh, list(zip(W_, b_)), list(zip(gW_, gb_)), n_residual=nres, backend=backend)
    g_out, g_gate = upstream(B, O, E)
    torch.autograd.backward([out, gate], [g_out.to("cuda", torch.float32), g_gate.to("cuda", torch.float32)])
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    rh, rW, rb, rgW, rgb = ref_leaves[0], ref_leaves[1:1 + L], ref_leaves[1 + L:1 + 2 * L], \
        ref_leaves[1 + 2 * L:1 + 2 * L + J], ref_leaves[1 + 2 * L + J:]
    ro, rg = ge.gated_experts_ref(rh, list(zip(rW, rb)), list(zip(rgW, rgb)), n_residual=nres)
    torch.autograd.backward([ro, rg], [g_out, g_gate])
    assert rel(out, ro) < 1e-5 and rel(gate, rg) < 1e-5
    for a, b in zip(leaves, ref_leaves):
        assert rel(a.grad, b.grad) < 1e-4


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_empty_batch(backend):
    _require_gpu(backend)
    h, Ws, bs, gWs, gbs = make(3, 5, 8, 2, 2, 1, (), (4,), True, dtype=torch.float32, device="cuda")
    h = h[:0].contiguous()
    impl = _gpu_impl(backend)
    out, gate, saved = impl.forward(h, Ws, bs, gWs, gbs, 1)
    assert out.shape == (0, 2) and gate.shape == (0, 2)
    dh, dWs, dbs, dgWs, dgbs = impl.backward(out.new_zeros(0, 2), gate.new_zeros(0, 2), h, Ws, bs, gWs, gbs, 1,
                                             saved, gate)
    assert dh.shape == (0, 5) and all((d == 0).all() for d in [*dWs, *dbs, *dgWs, *dgbs])


# ------------------------------------------------------------------------------------------------ Triton on the CPU
def _triton_interpreted():
    pytest.importorskip("triton")
    from moekernels.ops.triton import gated_experts as tri
    from moekernels.ops.triton._common import is_interpreted

    if not is_interpreted(tri._gated_linear_kernel):
        pytest.skip("Triton kernels compiled for a GPU (TRITON_INTERPRET unset): the GPU tests cover them")
    return tri


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_interpreter_vs_contract(shape, dtype):
    """The Triton kernels under TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)."""
    check_impl(_triton_interpreted(), shape, dtype, "cpu", GPU_TOL[dtype])


def test_triton_interpreter_no_gate_grad():
    """g_gate=None (the gate output unused) equals a zero g_gate."""
    tri = _triton_interpreted()
    h, Ws, bs, gWs, gbs = make(21, 9, 16, 3, 3, 1, (), (5,), True)
    out, gate, saved = tri.forward(h, Ws, bs, gWs, gbs, 1)
    g_out = torch.randn_like(out)
    a = flat(tri.backward(g_out, None, h, Ws, bs, gWs, gbs, 1, saved, gate))
    b = flat(tri.backward(g_out, torch.zeros_like(gate), h, Ws, bs, gWs, gbs, 1, saved, gate))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_interpreter_half_forward(dtype):
    tri = _triton_interpreted()
    B, IN, hid, O, E, nres = 300, 48, 64, 2, 2, 3
    h, Ws, bs, gWs, gbs = make(B, IN, hid, O, E, nres, (), (32,), True, dtype=dtype)
    out, gate, saved = tri.forward(h, Ws, bs, gWs, gbs, nres)
    ro, rg, _, _ = reference(h, Ws, bs, gWs, gbs, nres, *upstream(B, O, E))
    assert rel(out, ro) < GPU_TOL[dtype] and rel(gate, rg) < GPU_TOL[dtype], (rel(out, ro), rel(gate, rg))


# ------------------------------------------------------------------------------------------------ emulator
_HARNESS = r"""
#include "emu.h"
#include EMU_KERNEL_SOURCE
using namespace moekernels::cuda;
extern "C" {
int ge_linear(int dt, const void* X, const void* W, const void* bias, const void* mask, void* Y, void* U,
              const int64_t* d /* M N K groups sxe sxm sxk swe swk swn sbe sye sym */, int flags) {
  GatedLinearArgs a;
  a.X = X; a.W = W; a.bias = bias; a.mask = mask; a.Y = Y; a.U = U;
  a.M = d[0]; a.N = d[1]; a.K = d[2]; a.groups = (int)d[3];
  a.sxe = d[4]; a.sxm = d[5]; a.sxk = d[6]; a.swe = d[7]; a.swk = d[8]; a.swn = d[9]; a.sbe = d[10];
  a.sye = d[11]; a.sym = d[12];
  a.pre_relu = flags & 1; a.residual = flags & 2; a.accum = flags & 4; a.group_sum = flags & 8;
  return gated_linear_cuda((GatedDType)dt, a, nullptr) == cudaSuccess ? 0 : 1;
}
int ge_head(int dt, const void* XE, const void* WE, const void* BE, const void* XG, const void* WG, const void* BG,
            void* Y, void* LOGIT, void* GATE, void* OUT, const int64_t* d /* B KE O E KG NL sxe sxm */, int flags) {
  GatedHeadArgs a;
  a.XE = XE; a.WE = WE; a.BE = BE; a.XG = XG; a.WG = WG; a.BG = BG; a.Y = Y; a.LOGIT = LOGIT; a.GATE = GATE;
  a.OUT = OUT; a.B = d[0]; a.KE = d[1]; a.O = d[2]; a.E = d[3]; a.KG = d[4]; a.NL = d[5]; a.sxe = d[6]; a.sxm = d[7];
  a.e_pre_relu = flags & 1; a.e_residual = flags & 2; a.g_pre_relu = flags & 4; a.sigmoid = flags & 8;
  return gated_head_fwd_cuda((GatedDType)dt, a, nullptr) == cudaSuccess ? 0 : 1;
}
int ge_mix(int dt, const void* GOUT, const void* GGATE, const void* Y, const void* GATE, void* DY, void* DLOGIT,
           int64_t B, int64_t O, int64_t E, int64_t NL, int sigmoid) {
  GatedMixBwdArgs a;
  a.GOUT = GOUT; a.GGATE = GGATE; a.Y = Y; a.GATE = GATE; a.DY = DY; a.DLOGIT = DLOGIT;
  a.B = B; a.O = O; a.E = E; a.NL = NL; a.sigmoid = sigmoid;
  return gated_mix_bwd_cuda((GatedDType)dt, a, nullptr) == cudaSuccess ? 0 : 1;
}
}
"""

_DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    from tests.cuda_emu import build as emu_build

    inc = emu_build.cuda_include_dir()
    if inc is None or shutil.which("g++") is None:
        pytest.skip("g++ or the CUDA headers (cuda_runtime_api.h, cuda_fp16.h) not found")
    out = tmp_path_factory.mktemp("gated_emu")
    src = emu_build.ROOT / "csrc/cuda/gated_experts_cuda.cu"
    inc_file = out / "gated_experts_cuda_emu.inc"
    inc_file.write_text(emu_build.rewrite_launches(src.read_text()))
    harness = out / "harness.cpp"
    harness.write_text(_HARNESS)
    lib = out / "libgated_emu.so"
    cmd = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           f"-I{emu_build.HERE}", f"-I{emu_build.ROOT / 'csrc/include'}", f"-I{emu_build.ROOT / 'csrc/cuda'}",
           f"-I{inc}", f'-DEMU_KERNEL_SOURCE="{inc_file}"', str(harness), "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    dll = ctypes.CDLL(str(lib))
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    dll.ge_linear.argtypes = [ctypes.c_int] + [vp] * 7 + [ctypes.c_int]
    dll.ge_head.argtypes = [ctypes.c_int] + [vp] * 11 + [ctypes.c_int]
    dll.ge_mix.argtypes = [ctypes.c_int] + [vp] * 6 + [i64] * 4 + [ctypes.c_int]
    return dll


class _EmuImpl:
    """The layer loop of csrc/cuda/gated_experts_bind.cpp, in Python, around the emulated launchers."""

    def __init__(self, dll):
        self.dll = dll

    @staticmethod
    def _p(t):
        return None if t is None else t.data_ptr()

    def linear(self, X, W, bias, Y, M, N, K, groups, sx, sw, sbe, sy, pre_relu=False, mask=None, U=None,
               residual=False, accum=False, group_sum=False):
        d = (ctypes.c_int64 * 13)(M, N, K, groups, *sx, *sw, sbe, *sy)
        flags = pre_relu | (residual << 1) | (accum << 2) | (group_sum << 3)
        rc = self.dll.ge_linear(_DT[Y.dtype], X.data_ptr(), W.data_ptr(), self._p(bias), self._p(mask), Y.data_ptr(),
                                self._p(U), ctypes.cast(d, ctypes.c_void_p), flags)
        assert rc == 0

    def forward(self, h, Ws, bs, gWs, gbs, nres):
        B, IN = h.shape
        L, J, E = len(Ws), len(gWs), Ws[0].shape[0]
        O, NL = Ws[-1].shape[2], gWs[-1].shape[1]
        out, gate = h.new_empty(B, O), h.new_empty(B, E)
        saved = [h.new_empty(B, E, W.shape[2]) for W in Ws] + [h.new_empty(B, W.shape[1]) for W in gWs]
        x, K, sx = h, IN, (0, IN, 1)
        for l in range(L - 1):
            N = Ws[l].shape[2]
            self.linear(x, Ws[l], bs[l], saved[l], B, N, K, E, sx, (K * N, N, 1), N, (N, E * N), pre_relu=l > 0,
                        residual=1 <= l <= nres)
            x, K, sx = saved[l], N, (N, E * N, 1)
        xe, ke, sxe = x, K, sx
        x, K = h, IN
        for j in range(J - 1):
            N = gWs[j].shape[1]
            self.linear(x, gWs[j], gbs[j], saved[L + j], B, N, K, 1, (0, K, 1), (0, N, 1), 0, (0, N), pre_relu=j > 0)
            x, K = saved[L + j], N
        d = (ctypes.c_int64 * 8)(B, ke, O, E, K, NL, sxe[0], sxe[1])
        flags = (L > 1) | ((1 <= L - 1 <= nres) << 1) | ((J > 1) << 2) | ((NL == 1 and E == 2) << 3)
        rc = self.dll.ge_head(_DT[h.dtype], xe.data_ptr(), Ws[-1].data_ptr(), bs[-1].data_ptr(), x.data_ptr(),
                              gWs[-1].data_ptr(), gbs[-1].data_ptr(), saved[L - 1].data_ptr(),
                              saved[L + J - 1].data_ptr(), gate.data_ptr(), out.data_ptr(),
                              ctypes.cast(d, ctypes.c_void_p), flags)
        assert rc == 0
        return out, gate, saved

    def backward(self, g_out, g_gate, h, Ws, bs, gWs, gbs, nres, saved, gate):
        B, IN = h.shape
        L, J, E = len(Ws), len(gWs), Ws[0].shape[0]
        O, NL = Ws[-1].shape[2], gWs[-1].shape[1]
        dy, dlogit = torch.empty_like(saved[L - 1]), h.new_empty(B, NL)
        rc = self.dll.ge_mix(_DT[h.dtype], g_out.data_ptr(), g_gate.data_ptr(), saved[L - 1].data_ptr(),
                             gate.data_ptr(), dy.data_ptr(), dlogit.data_ptr(), B, O, E, NL, int(NL == 1 and E == 2))
        assert rc == 0
        dWs, dbs, dgWs, dgbs = [None] * L, [None] * L, [None] * J, [None] * J
        da = dy
        for l in range(L - 1, 0, -1):
            K, N = Ws[l].shape[1], Ws[l].shape[2]
            da_prev, u = torch.empty_like(saved[l - 1]), torch.empty_like(saved[l - 1])
            self.linear(da, Ws[l], None, da_prev, B, K, N, E, (N, E * N, 1), (K * N, 1, N), 0, (K, E * K),
                        mask=saved[l - 1], U=u, residual=1 <= l <= nres)
            dWs[l] = torch.bmm(u.permute(1, 2, 0), da.transpose(0, 1))
            dbs[l] = da.sum(0)
            da = da_prev
        N0 = Ws[0].shape[2]
        dWs[0] = torch.mm(h.t(), da.reshape(B, E * N0)).view(IN, E, N0).permute(1, 0, 2).contiguous()
        dbs[0] = da.sum(0)
        dh = torch.empty_like(h)
        self.linear(da, Ws[0], None, dh, B, IN, N0, E, (N0, E * N0, 1), (IN * N0, 1, N0), 0, (0, IN),
                    group_sum=True)
        dz = dlogit
        for j in range(J - 1, 0, -1):
            K, N = gWs[j].shape
            dz_prev, u = torch.empty_like(saved[L + j - 1]), torch.empty_like(saved[L + j - 1])
            self.linear(dz, gWs[j], None, dz_prev, B, K, N, 1, (0, N, 1), (0, 1, N), 0, (0, K), mask=saved[L + j - 1],
                        U=u)
            dgWs[j], dgbs[j] = torch.mm(u.t(), dz), dz.sum(0)
            dz = dz_prev
        dgWs[0], dgbs[0] = torch.mm(h.t(), dz), dz.sum(0)
        G0 = gWs[0].shape[1]
        self.linear(dz, gWs[0], None, dh, B, IN, G0, 1, (0, G0, 1), (0, 1, G0), 0, (0, IN), accum=True)
        return dh, dWs, dbs, dgWs, dgbs


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_emulated_cuda_kernels_float64(emu_lib, shape):
    check_impl(_EmuImpl(emu_lib), shape, torch.float64, "cpu", 1e-12)


@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[-1:], ids=lambda s: "x".join(map(str, s[:6])))
def test_emulated_cuda_kernels_float32(emu_lib, shape):
    check_impl(_EmuImpl(emu_lib), shape, torch.float32, "cpu", 2e-5)


def test_emulated_cuda_kernels_detect_a_broken_mask(emu_lib):
    """The comparison can fail: a backward with the relu mask dropped is caught."""
    impl = _EmuImpl(emu_lib)
    orig = impl.linear

    def no_mask(*a, **k):
        if k.get("mask") is not None:  # U = relu(activations) still written, only the relu' mask is missing
            k["U"].copy_(torch.relu(k["mask"]))
            k["mask"] = k["U"] = None
        return orig(*a, **k)

    impl.linear = no_mask
    with pytest.raises(AssertionError, match="assert .* < 1e-12"):
        check_impl(impl, SHAPES[0], torch.float64, "cpu", 1e-12)
