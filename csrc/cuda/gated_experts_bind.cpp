// gated_experts on CUDA tensors: the torch side of csrc/cuda/gated_experts_cuda.cu (DESIGN.md 3.3).
// Registers moekernels::gated_experts_fwd / gated_experts_bwd (schemas in csrc/ops.cpp) for the CUDA dispatch key:
// checks the inputs, allocates the outputs and the saved pre-activations with the caching allocator, runs the
// layer loop (one grouped-GEMM launch per layer, the fused head / mix-backward kernels) on the current stream, and
// computes the weight gradients dW_l = relu(a_{l-1})^T da_l, db_l = sum_rows da_l with ATen GEMMs / sums on the
// tensors the kernels wrote (relu(a_{l-1}) comes out of the data-gradient kernel's epilogue). Only c10/cuda
// headers (no ATen/cuda/CUDAContext.h, which would pull in cuBLAS/cuSPARSE/cuSOLVER headers).
//
// Layouts (moekernels/ops/gated_experts.py): saved = [a_0 .. a_{L-1} as (B, E, out_l), z_0 .. z_{J-1} as
// (B, out_j)]; a_{L-1} is the expert outputs y, z_{J-1} the gate logits.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

#include "gated_experts_cuda.h"

namespace {

using moekernels::cuda::GatedDType;
using moekernels::cuda::GatedHeadArgs;
using moekernels::cuda::GatedLinearArgs;
using moekernels::cuda::GatedMixBwdArgs;

GatedDType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return GatedDType::kFloat32;
    case at::kDouble:
      return GatedDType::kFloat64;
    case at::kHalf:
      return GatedDType::kFloat16;
    case at::kBFloat16:
      return GatedDType::kBFloat16;
    default:
      TORCH_CHECK(false, "gated_experts (cuda): unsupported dtype ", st,
                  "; expected float32, float64, float16 or bfloat16");
  }
  return GatedDType::kFloat32;  // unreachable
}

at::Tensor prep(const at::Tensor& t, const char* what, int64_t i, const at::Tensor& h) {
  TORCH_CHECK(t.defined(), "gated_experts (cuda): ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == h.device(), "gated_experts (cuda): ", what, "[", i, "] is on ", t.device(),
              " but h is on ", h.device());
  TORCH_CHECK(t.scalar_type() == h.scalar_type(), "gated_experts (cuda): ", what, "[", i, "] has dtype ",
              t.scalar_type(), " but h has dtype ", h.scalar_type());
  return t.contiguous();
}

std::vector<at::Tensor> prep_list(at::TensorList ts, const char* what, const at::Tensor& h) {
  std::vector<at::Tensor> v;
  v.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) v.push_back(prep(ts[i], what, static_cast<int64_t>(i), h));
  return v;
}

struct Net {
  int64_t B = 0, IN = 0, E = 0, L = 0, J = 0, O = 0, NL = 0;
  bool sigmoid = false;
};

Net check(const at::Tensor& h, const std::vector<at::Tensor>& Ws, const std::vector<at::Tensor>& bs,
          const std::vector<at::Tensor>& gWs, const std::vector<at::Tensor>& gbs, int64_t n_residual) {
  TORCH_CHECK(h.is_cuda(), "gated_experts (cuda): h must be a CUDA tensor, got ", h.device());
  TORCH_CHECK(h.dim() == 2, "gated_experts (cuda): h must be (B, in), got ", h.sizes());
  TORCH_CHECK(!Ws.empty() && Ws.size() == bs.size(), "gated_experts (cuda): Ws and bs must be non-empty lists of "
              "the same length, got ", Ws.size(), " and ", bs.size());
  TORCH_CHECK(!gWs.empty() && gWs.size() == gbs.size(), "gated_experts (cuda): gWs and gbs must be non-empty "
              "lists of the same length, got ", gWs.size(), " and ", gbs.size());
  Net n;
  n.B = h.size(0);
  n.IN = h.size(1);
  n.L = static_cast<int64_t>(Ws.size());
  n.J = static_cast<int64_t>(gWs.size());
  TORCH_CHECK(Ws[0].dim() == 3 && Ws[0].size(0) >= 1, "gated_experts (cuda): Ws[0] must be (E, in, out), got ",
              Ws[0].sizes());
  n.E = Ws[0].size(0);
  int64_t w = n.IN;
  for (int64_t l = 0; l < n.L; ++l) {
    const auto& W = Ws[l];
    TORCH_CHECK(W.dim() == 3 && W.size(0) == n.E && W.size(1) == w && W.size(2) >= 1, "gated_experts (cuda): Ws[",
                l, "] must be (E=", n.E, ", in=", w, ", out), got ", W.sizes());
    TORCH_CHECK(bs[l].dim() == 2 && bs[l].size(0) == n.E && bs[l].size(1) == W.size(2), "gated_experts (cuda): bs[",
                l, "] must be (E, out)=(", n.E, ", ", W.size(2), "), got ", bs[l].sizes());
    TORCH_CHECK(!(l >= 1 && l <= n_residual) || W.size(1) == W.size(2), "gated_experts (cuda): Ws[", l,
                "] is a residual layer and must be square, got ", W.sizes());
    w = W.size(2);
  }
  TORCH_CHECK(n_residual >= 0 && n_residual <= n.L - 1, "gated_experts (cuda): n_residual must be in [0, ", n.L - 1,
              "], got ", n_residual);
  n.O = w;
  w = n.IN;
  for (int64_t j = 0; j < n.J; ++j) {
    const auto& W = gWs[j];
    TORCH_CHECK(W.dim() == 2 && W.size(0) == w && W.size(1) >= 1, "gated_experts (cuda): gWs[", j,
                "] must be (in=", w, ", out), got ", W.sizes());
    TORCH_CHECK(gbs[j].dim() == 1 && gbs[j].size(0) == W.size(1), "gated_experts (cuda): gbs[", j,
                "] must be (out,)=(", W.size(1), ",), got ", gbs[j].sizes());
    w = W.size(1);
  }
  n.NL = w;
  n.sigmoid = n.NL == 1 && n.E == 2;
  TORCH_CHECK(n.sigmoid || n.NL == n.E, "gated_experts (cuda): the gate's last layer must output E=", n.E,
              " logits (or 1 when E == 2), got ", n.NL);
  TORCH_CHECK(n.E <= 32, "gated_experts (cuda): at most 32 experts (one warp lane per gate entry), got ", n.E);
  return n;
}

bool is_residual(int64_t l, int64_t n_residual) { return l >= 1 && l <= n_residual; }

// Launch the grouped linear kernel. sx = (sxe, sxm, sxk), sw = (swe, swk, swn), sy = (sye, sym).
void linear(GatedDType dt, cudaStream_t stream, const at::Tensor& X, const at::Tensor& W, const at::Tensor* bias,
            at::Tensor& Y, int64_t M, int64_t N, int64_t K, int64_t groups, std::array<int64_t, 3> sx,
            std::array<int64_t, 3> sw, int64_t sbe, std::array<int64_t, 2> sy, bool pre_relu = false,
            const at::Tensor* mask = nullptr, at::Tensor* U = nullptr, bool residual = false, bool accum = false,
            bool group_sum = false) {
  GatedLinearArgs a;
  a.X = X.data_ptr();
  a.W = W.data_ptr();
  a.bias = bias != nullptr ? bias->data_ptr() : nullptr;
  a.mask = mask != nullptr ? mask->data_ptr() : nullptr;
  a.Y = Y.data_ptr();
  a.U = U != nullptr ? U->data_ptr() : nullptr;
  a.M = M;
  a.N = N;
  a.K = K;
  a.groups = static_cast<int>(groups);
  a.sxe = sx[0];
  a.sxm = sx[1];
  a.sxk = sx[2];
  a.swe = sw[0];
  a.swk = sw[1];
  a.swn = sw[2];
  a.sbe = sbe;
  a.sye = sy[0];
  a.sym = sy[1];
  a.pre_relu = pre_relu;
  a.residual = residual;
  a.accum = accum;
  a.group_sum = group_sum;
  C10_CUDA_CHECK(moekernels::cuda::gated_linear_cuda(dt, a, stream));
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> gated_experts_fwd_cuda_op(
    const at::Tensor& h_in, at::TensorList Ws_in, at::TensorList bs_in, at::TensorList gWs_in,
    at::TensorList gbs_in, int64_t n_residual) {
  TORCH_CHECK(h_in.is_cuda(), "gated_experts (cuda): h must be a CUDA tensor, got ", h_in.device());
  const GatedDType dt = to_dtype(h_in.scalar_type());
  const at::Tensor h = h_in.contiguous();
  const auto Ws = prep_list(Ws_in, "Ws", h), bs = prep_list(bs_in, "bs", h);
  const auto gWs = prep_list(gWs_in, "gWs", h), gbs = prep_list(gbs_in, "gbs", h);
  const Net n = check(h, Ws, bs, gWs, gbs, n_residual);
  const int64_t B = n.B, E = n.E, L = n.L, J = n.J;

  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = at::empty({B, n.O}, h.options());
  at::Tensor gate = at::empty({B, E}, h.options());
  std::vector<at::Tensor> saved;
  for (int64_t l = 0; l < L; ++l) saved.push_back(at::empty({B, E, Ws[l].size(2)}, h.options()));
  for (int64_t j = 0; j < J; ++j) saved.push_back(at::empty({B, gWs[j].size(1)}, h.options()));
  if (B == 0) return {out, gate, saved};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(h.device().index()).stream();

  // expert hidden layers (layer 0 reads the shared h: expert stride 0)
  const at::Tensor* x = &h;
  int64_t K = n.IN;
  std::array<int64_t, 3> sx = {0, n.IN, 1};
  for (int64_t l = 0; l < L - 1; ++l) {
    const int64_t N = Ws[l].size(2);
    linear(dt, stream, *x, Ws[l], &bs[l], saved[l], B, N, K, E, sx, {K * N, N, 1}, N, {N, E * N},
           /*pre_relu=*/l > 0, nullptr, nullptr, is_residual(l, n_residual));
    x = &saved[l];
    K = N;
    sx = {N, E * N, 1};
  }
  const at::Tensor* xe = x;
  const int64_t ke = K;
  const auto sxe = sx;
  // gate hidden layers
  x = &h;
  K = n.IN;
  for (int64_t j = 0; j < J - 1; ++j) {
    const int64_t N = gWs[j].size(1);
    linear(dt, stream, *x, gWs[j], &gbs[j], saved[L + j], B, N, K, 1, {0, K, 1}, {0, N, 1}, 0, {0, N},
           /*pre_relu=*/j > 0);
    x = &saved[L + j];
    K = N;
  }
  // last layers + gate nonlinearity + mix
  GatedHeadArgs a;
  a.XE = xe->data_ptr();
  a.WE = Ws[L - 1].data_ptr();
  a.BE = bs[L - 1].data_ptr();
  a.XG = x->data_ptr();
  a.WG = gWs[J - 1].data_ptr();
  a.BG = gbs[J - 1].data_ptr();
  a.Y = saved[L - 1].data_ptr();
  a.LOGIT = saved[L + J - 1].data_ptr();
  a.GATE = gate.data_ptr();
  a.OUT = out.data_ptr();
  a.B = B;
  a.KE = ke;
  a.O = n.O;
  a.E = E;
  a.KG = K;
  a.NL = n.NL;
  a.sxe = sxe[0];
  a.sxm = sxe[1];
  a.e_pre_relu = L > 1;
  a.e_residual = is_residual(L - 1, n_residual);
  a.g_pre_relu = J > 1;
  a.sigmoid = n.sigmoid;
  C10_CUDA_CHECK(moekernels::cuda::gated_head_fwd_cuda(dt, a, stream));
  return {out, gate, saved};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
gated_experts_bwd_cuda_op(const at::Tensor& g_out_in, const at::Tensor& g_gate_in, const at::Tensor& h_in,
                          at::TensorList Ws_in, at::TensorList bs_in, at::TensorList gWs_in, at::TensorList gbs_in,
                          int64_t n_residual, at::TensorList saved_in, const at::Tensor& gate_in) {
  TORCH_CHECK(h_in.is_cuda(), "gated_experts (cuda): h must be a CUDA tensor, got ", h_in.device());
  const GatedDType dt = to_dtype(h_in.scalar_type());
  const at::Tensor h = h_in.contiguous();
  const auto Ws = prep_list(Ws_in, "Ws", h), bs = prep_list(bs_in, "bs", h);
  const auto gWs = prep_list(gWs_in, "gWs", h), gbs = prep_list(gbs_in, "gbs", h);
  const Net n = check(h, Ws, bs, gWs, gbs, n_residual);
  const int64_t B = n.B, E = n.E, L = n.L, J = n.J, IN = n.IN;
  const auto saved = prep_list(saved_in, "saved", h);
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == L + J, "gated_experts (cuda): saved must hold ", L + J,
              " tensors, got ", saved.size());
  for (int64_t l = 0; l < L; ++l)
    TORCH_CHECK(saved[l].dim() == 3 && saved[l].size(0) == B && saved[l].size(1) == E &&
                    saved[l].size(2) == Ws[l].size(2),
                "gated_experts (cuda): saved[", l, "] must be (B, E, out_l), got ", saved[l].sizes());
  for (int64_t j = 0; j < J; ++j)
    TORCH_CHECK(saved[L + j].dim() == 2 && saved[L + j].size(0) == B && saved[L + j].size(1) == gWs[j].size(1),
                "gated_experts (cuda): saved[", L + j, "] must be (B, out_j), got ", saved[L + j].sizes());
  // upstream grads may arrive in another float dtype (autocast); the kernels read h's dtype
  const at::Tensor g_out = prep(g_out_in.to(h.scalar_type()), "g_out", 0, h);
  const at::Tensor gate = prep(gate_in, "gate", 0, h);
  TORCH_CHECK(g_out.dim() == 2 && g_out.size(0) == B && g_out.size(1) == n.O, "gated_experts (cuda): g_out must be (",
              B, ", ", n.O, "), got ", g_out.sizes());
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == B && gate.size(1) == E, "gated_experts (cuda): gate must be (", B,
              ", ", E, "), got ", gate.sizes());
  at::Tensor g_gate;
  if (g_gate_in.defined()) {
    g_gate = prep(g_gate_in.to(h.scalar_type()), "g_gate", 0, h);
    TORCH_CHECK(g_gate.sizes() == gate.sizes(), "gated_experts (cuda): g_gate must be (", B, ", ", E, "), got ",
                g_gate.sizes());
  }

  const c10::cuda::CUDAGuard guard(h.device());
  std::vector<at::Tensor> dWs(L), dbs(L), dgWs(J), dgbs(J);
  if (B == 0) {
    for (int64_t l = 0; l < L; ++l) {
      dWs[l] = at::zeros_like(Ws[l]);
      dbs[l] = at::zeros_like(bs[l]);
    }
    for (int64_t j = 0; j < J; ++j) {
      dgWs[j] = at::zeros_like(gWs[j]);
      dgbs[j] = at::zeros_like(gbs[j]);
    }
    return {at::zeros_like(h), dWs, dbs, dgWs, dgbs};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(h.device().index()).stream();

  // mix backward: dy (B, E, O), dlogits (B, NL)
  at::Tensor dy = at::empty_like(saved[L - 1]);
  at::Tensor dlogit = at::empty({B, n.NL}, h.options());
  GatedMixBwdArgs m;
  m.GOUT = g_out.data_ptr();
  m.GGATE = g_gate.defined() ? g_gate.data_ptr() : nullptr;
  m.Y = saved[L - 1].data_ptr();
  m.GATE = gate.data_ptr();
  m.DY = dy.data_ptr();
  m.DLOGIT = dlogit.data_ptr();
  m.B = B;
  m.O = n.O;
  m.E = E;
  m.NL = n.NL;
  m.sigmoid = n.sigmoid;
  C10_CUDA_CHECK(moekernels::cuda::gated_mix_bwd_cuda(dt, m, stream));

  // experts, layers L-1 .. 1: da_{l-1} = [da_l +] relu'(a_{l-1}) * (da_l W_l^T), relu(a_{l-1}) from the epilogue
  at::Tensor da = dy;
  for (int64_t l = L - 1; l >= 1; --l) {
    const int64_t K = Ws[l].size(1), N = Ws[l].size(2);  // the layer maps K -> N
    const at::Tensor& a_prev = saved[l - 1];
    at::Tensor da_prev = at::empty_like(a_prev);
    at::Tensor u = at::empty_like(a_prev);
    linear(dt, stream, da, Ws[l], nullptr, da_prev, B, K, N, E, {N, E * N, 1}, {K * N, 1, N}, 0, {K, E * K},
           false, &a_prev, &u, is_residual(l, n_residual));
    dWs[l] = at::bmm(u.permute({1, 2, 0}), da.transpose(0, 1));
    dbs[l] = da.sum(0);
    da = da_prev;
  }
  const int64_t N0 = Ws[0].size(2);
  dWs[0] = at::mm(h.t(), da.view({B, E * N0})).view({IN, E, N0}).permute({1, 0, 2}).contiguous();
  dbs[0] = da.sum(0);
  at::Tensor dh = at::empty_like(h);
  // dh = sum_e da_0[e] W_0[e]^T: the expert loop inside one launch's reduction
  linear(dt, stream, da, Ws[0], nullptr, dh, B, IN, N0, E, {N0, E * N0, 1}, {IN * N0, 1, N0}, 0, {0, IN}, false,
         nullptr, nullptr, false, false, /*group_sum=*/true);
  // gate, layers J-1 .. 1, then dh += dz_0 gW_0^T
  at::Tensor dz = dlogit;
  for (int64_t j = J - 1; j >= 1; --j) {
    const int64_t K = gWs[j].size(0), N = gWs[j].size(1);
    const at::Tensor& z_prev = saved[L + j - 1];
    at::Tensor dz_prev = at::empty_like(z_prev);
    at::Tensor u = at::empty_like(z_prev);
    linear(dt, stream, dz, gWs[j], nullptr, dz_prev, B, K, N, 1, {0, N, 1}, {0, 1, N}, 0, {0, K}, false, &z_prev,
           &u);
    dgWs[j] = at::mm(u.t(), dz);
    dgbs[j] = dz.sum(0);
    dz = dz_prev;
  }
  dgWs[0] = at::mm(h.t(), dz);
  dgbs[0] = dz.sum(0);
  const int64_t G0 = gWs[0].size(1);
  linear(dt, stream, dz, gWs[0], nullptr, dh, B, IN, G0, 1, {0, G0, 1}, {0, 1, G0}, 0, {0, IN}, false, nullptr,
         nullptr, false, /*accum=*/true);
  return {dh, dWs, dbs, dgWs, dgbs};
}

}  // namespace

TORCH_LIBRARY_IMPL(moekernels, CUDA, m) {
  m.impl("gated_experts_fwd", &gated_experts_fwd_cuda_op);
  m.impl("gated_experts_bwd", &gated_experts_bwd_cuda_op);
}
