// gated_experts (DESIGN.md 3.3) on the CPU: E expert MLPs with stacked weights, evaluated together, mixed by a
// softmax (E = 2: sigmoid) gate. The math and the kernel contract: moekernels/ops/gated_experts.py.
//
// Layout: the expert activations of layer l are (B, E, out_l) row-major (the experts side by side in a row), so
// layer 0 -- whose input h is shared -- is ONE GEMM  h (B x in) x W0cat (in x E*out0), and every later layer is
// one GEMM per expert on strided row blocks (lda = E*in_l, ldc = E*out_l), no copies. These are also the saved
// pre-activations the backward uses.
//
// Forward: rows in blocks of 256 (MOEKERNELS_GATED_BLOCK), blocks in parallel (each GEMM single-threaded inside at::parallel_for),
// every layer of a block done while its activations are cache-resident: GEMM (beta = 0) into the saved
// activation, then ONE pass over the block adding the bias (+ the residual input) and writing relu(.) into the
// thread's input buffer of the next GEMM. The gate MLP runs first on the block; the mix out = sum_e gate_e y_e is
// fused into the last layer's epilogue.
// Inference (gated_experts_infer, used under no_grad): the same, but the activations live only in per-thread
// block buffers (ping-pong), never written out -- no B x E x hidden traffic to memory.
//
// Backward: whole-batch GEMMs (the BLAS threads them), elementwise passes parallel over row chunks:
//   head pass:   dgate_e = g_gate_e + g_out . y_e ; G = gate_e g_out ; gate logits' gradient (softmax/sigmoid)
//   per layer l: dW_l = R^T G ; D = G W_l^T ; G <- (residual ? G : 0) + D * [R > 0]  with R = relu(a_{l-1})
//                made by the previous pass (the head pass, or layer l+1's epilogue) while it streams the rows
//   layer 0:     dW_0 = h^T G ; dh = dZ_0 gW_0^T + G W0cat^T (one GEMM over all experts: K = E*out0), skipped by
//                gated_experts_bwd_params (h does not require grad)
// Bias gradients (column sums) are accumulated in the epilogue that produces each G, per row chunk, and reduced
// in a fixed order (deterministic for a given thread count).
//
// GEMMs go straight to the BLAS torch links (sgemm_/dgemm_, found at load time as weak symbols, as torch's own
// CPU matmul calls them); without them, at::addmm_ on strided views.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define GATED_WEAK_BLAS 1
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}
#endif

namespace moekernels {
namespace gated {
namespace {

using at::Tensor;
using at::TensorList;

// ------------------------------------------------------------------------------------------------ GEMM
// Row-major C (M x N, ldc) = op(A) op(B) + beta C with op(A) M x K (A stored M x K, or K x M when ta) and op(B)
// K x N (B stored K x N, or N x K when tb).
template <typename T>
void gemm_fallback(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                   int64_t ldb, T beta, T* C, int64_t ldc) {
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor a = at::from_blob(const_cast<T*>(A), {ta ? K : M, ta ? M : K}, {lda, 1}, opt);
  Tensor b = at::from_blob(const_cast<T*>(B), {tb ? N : K, tb ? K : N}, {ldb, 1}, opt);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  c.addmm_(ta ? a.t() : a, tb ? b.t() : b, beta, 1);
}

template <typename T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
          T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i) {
      T* c = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) c[j] = beta == T(0) ? T(0) : beta * c[j];
    }
    return;
  }
#ifdef GATED_WEAK_BLAS
  const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(std::max<int64_t>(1, ldb)), lb = static_cast<int>(std::max<int64_t>(1, lda));
  const int lc = static_cast<int>(std::max<int64_t>(1, ldc));
  const T one = 1;
  // column-major view: C^T (N x M) = op(B)^T op(A)^T
  if constexpr (std::is_same<T, float>::value) {
    if (sgemm_ != nullptr) {
      sgemm_(&ctb, &cta, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&ctb, &cta, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
      return;
    }
  }
#endif
  gemm_fallback<T>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

// ------------------------------------------------------------------------------------------------ helpers
int64_t block_rows() {
  static const int64_t nb = [] {
    const char* s = std::getenv("MOEKERNELS_GATED_BLOCK");
    int64_t v = s ? std::atoll(s) : 0;
    return v > 0 ? v : int64_t(256);
  }();
  return nb;
}

// Rows [0, B) in nchunks contiguous chunks (the split depends only on B and the thread count).
template <typename F>
void for_chunks(int64_t B, int64_t nchunks, const F& fn) {
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c, B * c / nchunks, B * (c + 1) / nchunks);
  });
}

template <typename T>
inline void relu_copy(const T* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = src[k] > T(0) ? src[k] : T(0);
}

// Scratch memory reused across calls (per thread, grow-only) up to kCacheElems elements a buffer: no page faults
// or zero-fill per call; bigger buffers are allocated per call (uninitialised).
constexpr size_t kCacheElems = size_t(1) << 22;

template <typename T>
struct Scratch {
  std::unique_ptr<T[]> own;
  T* get(std::vector<T>& cache, size_t n) {
    if (n <= kCacheElems) {
      if (cache.size() < n) cache.resize(n);
      return cache.data();
    }
    own.reset(new T[n]);
    return own.get();
  }
};

// Gate weights of one row from its logits (nz = E for softmax, or 1 with E == 2 for the sigmoid gate).
template <typename T>
inline void gate_row(const T* z, int64_t nz, int64_t E, T* g) {
  if (nz == 1 && E == 2) {
    const T x = z[0];
    const T ex = std::exp(-std::abs(x));  // stable: sigmoid(x) and sigmoid(-x) without overflow
    const T big = T(1) / (T(1) + ex), small = ex / (T(1) + ex);
    g[0] = x >= 0 ? big : small;
    g[1] = x >= 0 ? small : big;
    return;
  }
  T m = z[0];
  for (int64_t e = 1; e < E; ++e) m = std::max(m, z[e]);
  T s = 0;
  for (int64_t e = 0; e < E; ++e) {
    g[e] = std::exp(z[e] - m);
    s += g[e];
  }
  const T inv = T(1) / s;
  for (int64_t e = 0; e < E; ++e) g[e] *= inv;
}

struct Dims {
  int64_t B, in, E, L, G, nres, out, gz;  // gz: width of the gate logits (E, or 1 for the sigmoid gate)
  std::vector<int64_t> li, lo, gi, go;  // expert layer in/out widths, gate layer in/out widths
  int64_t maxw, maxg;  // max E*width over expert layers' inputs/outputs, max gate width
};

Dims dims_of(const Tensor& h, TensorList Ws, TensorList bs, TensorList gWs, TensorList gbs, int64_t n_residual) {
  TORCH_CHECK(h.dim() == 2, "gated_experts: h must be (B, in)");
  TORCH_CHECK(Ws.size() >= 1 && Ws.size() == bs.size(), "gated_experts: Ws and bs must be non-empty lists of equal length");
  TORCH_CHECK(gWs.size() >= 1 && gWs.size() == gbs.size(), "gated_experts: gWs and gbs must be non-empty lists of equal length");
  Dims d;
  d.B = h.size(0);
  d.in = h.size(1);
  d.E = Ws[0].size(0);
  d.L = static_cast<int64_t>(Ws.size());
  d.G = static_cast<int64_t>(gWs.size());
  d.nres = n_residual;
  TORCH_CHECK(n_residual >= 0 && n_residual <= d.L - 1, "gated_experts: n_residual must be in [0, L-1]");
  int64_t w = d.in;
  d.maxw = d.E * d.in;
  for (int64_t l = 0; l < d.L; ++l) {
    const Tensor& W = Ws[l];
    TORCH_CHECK(W.dim() == 3 && W.size(0) == d.E && W.size(1) == w, "gated_experts: Ws[", l, "] must be (E, ", w, ", out)");
    TORCH_CHECK(bs[l].numel() == d.E * W.size(2), "gated_experts: bs[", l, "] must be (E, out)");
    TORCH_CHECK(l == 0 || l > n_residual || W.size(1) == W.size(2), "gated_experts: residual layer ", l, " must be square");
    TORCH_CHECK(W.scalar_type() == h.scalar_type() && bs[l].scalar_type() == h.scalar_type(),
                "gated_experts: all tensors must have h's dtype");
    d.li.push_back(w);
    d.lo.push_back(W.size(2));
    w = W.size(2);
    d.maxw = std::max(d.maxw, d.E * w);
  }
  d.out = w;
  w = d.in;
  d.maxg = 1;
  for (int64_t j = 0; j < d.G; ++j) {
    const Tensor& W = gWs[j];
    TORCH_CHECK(W.dim() == 2 && W.size(0) == w, "gated_experts: gWs[", j, "] must be (", w, ", out)");
    TORCH_CHECK(gbs[j].numel() == W.size(1), "gated_experts: gbs[", j, "] must be (out,)");
    TORCH_CHECK(W.scalar_type() == h.scalar_type() && gbs[j].scalar_type() == h.scalar_type(),
                "gated_experts: all tensors must have h's dtype");
    d.gi.push_back(w);
    d.go.push_back(W.size(1));
    w = W.size(1);
    d.maxg = std::max(d.maxg, w);
  }
  d.gz = w;
  TORCH_CHECK(d.gz == d.E || (d.E == 2 && d.gz == 1), "gated_experts: the gate must output E logits (or 1 when E == 2)");
  return d;
}

std::vector<Tensor> contig(TensorList ts) {
  std::vector<Tensor> v;
  v.reserve(ts.size());
  for (const auto& t : ts) v.push_back(t.contiguous());
  return v;
}

// ------------------------------------------------------------------------------------------------ forward
template <typename T>
void forward_impl(const Dims& d, const T* h, const std::vector<const T*>& W, const std::vector<const T*>& b,
                  const T* W0cat, const std::vector<const T*>& gW, const std::vector<const T*>& gb,
                  const std::vector<T*>& a, const std::vector<T*>& z, T* out, T* gate) {
  const int64_t E = d.E, L = d.L, G = d.G;
  const bool keep = !a.empty();  // training: write every pre-activation into saved; inference: block scratch only
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  // at most block_rows() rows per block; smaller batches split evenly over the threads (at least 32 rows a block)
  const int64_t nb = std::min(block_rows(), std::max<int64_t>(32, (d.B + nthreads - 1) / nthreads));
  const int64_t nblocks = (d.B + nb - 1) / nb;
  // Blocks handed out dynamically (an atomic counter): on a shared machine a thread that loses its core does not
  // hold back the others. Every block is computed the same way whoever takes it (deterministic results).
  std::atomic<int64_t> next{0};
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(nthreads, nblocks));
  at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
    static thread_local std::vector<T> c_R, c_RG, c_S0, c_S1, c_Z;
    Scratch<T> s_R, s_RG, s_S0, s_S1, s_Z;
    T* R = s_R.get(c_R, static_cast<size_t>(nb * d.maxw));
    T* RG = s_RG.get(c_RG, static_cast<size_t>(nb * d.maxg));
    // inference (no saved activations): ping-pong block buffers for the layers, one for the gate's layers
    T* S[2] = {keep ? nullptr : s_S0.get(c_S0, static_cast<size_t>(nb * d.maxw)),
               keep ? nullptr : s_S1.get(c_S1, static_cast<size_t>(nb * d.maxw))};
    T* Zs = keep ? nullptr : s_Z.get(c_Z, static_cast<size_t>(nb * d.maxg));
    for (int64_t blk = next.fetch_add(1); blk < nblocks; blk = next.fetch_add(1)) {
      const int64_t r0 = blk * nb, nr = std::min(nb, d.B - r0);
      const T* hb = h + r0 * d.in;
      // ---- gate MLP on the block
      const T* gin = hb;
      int64_t gld = d.in;
      for (int64_t j = 0; j < G; ++j) {
        const int64_t no = d.go[j];
        T* Z = keep ? z[j] + r0 * no : Zs;
        gemm<T>(false, false, nr, no, d.gi[j], gin, gld, gW[j], no, T(0), Z, no);
        const T* bj = gb[j];
        const bool next = j + 1 < G;
        for (int64_t r = 0; r < nr; ++r) {
          T* zr = Z + r * no;
          T* rr = RG + r * no;
          for (int64_t k = 0; k < no; ++k) {
            const T v = zr[k] + bj[k];
            zr[k] = v;
            if (next) rr[k] = v > T(0) ? v : T(0);
          }
          if (!next) gate_row<T>(zr, no, E, gate + (r0 + r) * E);
        }
        gin = RG;
        gld = no;
      }
      // ---- experts
      for (int64_t l = 0; l < L; ++l) {
        const int64_t ni = d.li[l], no = d.lo[l], wo = E * no, wi = E * ni;
        T* C = keep ? a[l] + r0 * wo : S[l & 1];
        if (l == 0) {
          gemm<T>(false, false, nr, wo, d.in, hb, d.in, W0cat, wo, T(0), C, wo);
        } else {
          for (int64_t e = 0; e < E; ++e)
            gemm<T>(false, false, nr, no, ni, R + e * ni, wi, W[l] + e * ni * no, no, T(0), C + e * no, wo);
        }
        const T* bl = b[l];
        const T* P = (l >= 1 && l <= d.nres) ? (keep ? a[l - 1] + r0 * wi : S[(l - 1) & 1]) : nullptr;  // residual in
        const bool last = l == L - 1;
        for (int64_t r = 0; r < nr; ++r) {
          T* cr = C + r * wo;
          if (P != nullptr) {
            const T* pr = P + r * wo;
            for (int64_t k = 0; k < wo; ++k) cr[k] += bl[k] + pr[k];
          } else {
            for (int64_t k = 0; k < wo; ++k) cr[k] += bl[k];
          }
          if (!last) {
            relu_copy(cr, R + r * wo, wo);
          } else {  // the mix: out = sum_e gate_e y_e
            const T* g = gate + (r0 + r) * E;
            T* o = out + (r0 + r) * no;
            for (int64_t k = 0; k < no; ++k) o[k] = g[0] * cr[k];
            for (int64_t e = 1; e < E; ++e) {
              const T ge = g[e];
              const T* ce = cr + e * no;
              for (int64_t k = 0; k < no; ++k) o[k] += ge * ce[k];
            }
          }
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> fwd_common(const Tensor& h_, TensorList Ws_, TensorList bs_,
                                                           TensorList gWs_, TensorList gbs_, int64_t n_residual,
                                                           bool keep) {
  TORCH_CHECK(h_.device().is_cpu(), "gated_experts_fwd (cpu): h must be a CPU tensor");
  TORCH_CHECK(h_.scalar_type() == at::kFloat || h_.scalar_type() == at::kDouble,
              "gated_experts_fwd (cpu): float32 or float64 only, got ", h_.scalar_type());
  const Dims d = dims_of(h_, Ws_, bs_, gWs_, gbs_, n_residual);
  Tensor h = h_.contiguous();
  auto Ws = contig(Ws_), bs = contig(bs_), gWs = contig(gWs_), gbs = contig(gbs_);
  auto opt = h.options();
  std::vector<Tensor> saved;
  if (keep) {
    for (int64_t l = 0; l < d.L; ++l) saved.push_back(at::empty({d.B, d.E, d.lo[l]}, opt));
    for (int64_t j = 0; j < d.G; ++j) saved.push_back(at::empty({d.B, d.go[j]}, opt));
  }
  Tensor out = at::empty({d.B, d.out}, opt), gate = at::empty({d.B, d.E}, opt);
  if (d.B == 0) return {out, gate, saved};
  Tensor W0cat = Ws[0].permute({1, 0, 2}).reshape({d.in, d.E * d.lo[0]}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gated_experts_fwd_cpu", [&] {
    std::vector<const scalar_t*> W, b, gW, gb;
    std::vector<scalar_t*> a, z;
    for (int64_t l = 0; l < d.L; ++l) {
      W.push_back(Ws[l].data_ptr<scalar_t>());
      b.push_back(bs[l].data_ptr<scalar_t>());
      if (keep) a.push_back(saved[l].data_ptr<scalar_t>());
    }
    for (int64_t j = 0; j < d.G; ++j) {
      gW.push_back(gWs[j].data_ptr<scalar_t>());
      gb.push_back(gbs[j].data_ptr<scalar_t>());
      if (keep) z.push_back(saved[d.L + j].data_ptr<scalar_t>());
    }
    forward_impl<scalar_t>(d, h.data_ptr<scalar_t>(), W, b, W0cat.data_ptr<scalar_t>(), gW, gb, a, z,
                           out.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>());
  });
  return {out, gate, saved};
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> gated_experts_fwd_cpu(const Tensor& h, TensorList Ws, TensorList bs,
                                                                      TensorList gWs, TensorList gbs,
                                                                      int64_t n_residual) {
  return fwd_common(h, Ws, bs, gWs, gbs, n_residual, true);
}

// Inference (no gradients): the same forward without writing the activations out (block scratch only).
std::tuple<Tensor, Tensor> gated_experts_infer_cpu(const Tensor& h, TensorList Ws, TensorList bs, TensorList gWs,
                                                   TensorList gbs, int64_t n_residual) {
  auto r = fwd_common(h, Ws, bs, gWs, gbs, n_residual, false);
  return {std::get<0>(r), std::get<1>(r)};
}

// ------------------------------------------------------------------------------------------------ backward
// Column sums of per-chunk partials, reduced in chunk order.
template <typename T>
void reduce_partials(const std::vector<T>& part, int64_t nchunks, int64_t n, T* dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] = T(0);
  for (int64_t c = 0; c < nchunks; ++c) {
    const T* p = part.data() + c * n;
    for (int64_t k = 0; k < n; ++k) dst[k] += p[k];
  }
}

template <typename T>
void backward_impl(const Dims& d, const T* g_out, const T* g_gate, const T* h, const std::vector<const T*>& W,
                   const T* W0cat, const std::vector<const T*>& gW, const std::vector<const T*>& a,
                   const std::vector<const T*>& z, const T* gate, T* dh, const std::vector<T*>& dW,
                   const std::vector<T*>& db, const std::vector<T*>& dgW, const std::vector<T*>& dgb) {
  const int64_t B = d.B, E = d.E, L = d.L, G = d.G;
  // rows per elementwise chunk at least MOEKERNELS_GATED_CHUNK_ROWS (default 16; a tuning knob)
  static const int64_t min_rows = [] {
    const char* s = std::getenv("MOEKERNELS_GATED_CHUNK_ROWS");
    int64_t v = s ? std::atoll(s) : 0;
    return v > 0 ? v : int64_t(16);
  }();
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (B + min_rows - 1) / min_rows));
  // buffers: two expert-gradient buffers (B x maxw), relu'd inputs (B x maxw), gate gradients (2 x B x maxg)
  static thread_local std::vector<T> c_G, c_D, c_R, c_R2, c_DZ, c_DZ2;
  Scratch<T> s_G, s_D, s_R, s_R2, s_DZ, s_DZ2;
  T* Gp = s_G.get(c_G, static_cast<size_t>(B * d.maxw));
  T* Dp = s_D.get(c_D, static_cast<size_t>(B * d.maxw));
  T* Rbuf = s_R.get(c_R, static_cast<size_t>(B * std::max(d.maxw, d.maxg)));  // gate: relu(z_{j-1})
  // experts: relu(a_{l-1}), the input of layer l, ping-pong: made in the pass before it is needed (the head pass
  // makes relu(a_{L-2}); the epilogue of layer l makes relu(a_{l-2}) for layer l-1)
  T* Rcur = s_R2.get(c_R2, static_cast<size_t>(B * d.maxw));
  T* Rnext = L >= 3 ? Rbuf : nullptr;  // Rbuf is free again once the gate is done (the gate runs first)
  T* DZbuf = s_DZ.get(c_DZ, static_cast<size_t>(B * d.maxg));
  T* DZ2buf = s_DZ2.get(c_DZ2, static_cast<size_t>(B * d.maxg));
  std::vector<T> part;

  // ---- head: dgate, G_{L-1} = gate_e g_out (+ db_{L-1}), gate logits' gradient (+ dgb_{G-1})
  {
    const int64_t no = d.lo[L - 1], wo = E * no, nz = d.gz;
    part.assign(static_cast<size_t>(nchunks * (wo + nz)), T(0));
    for_chunks(B, nchunks, [&](int64_t c, int64_t r0, int64_t r1) {
      T* pb = part.data() + c * (wo + nz);
      T* pz = pb + wo;
      std::vector<T> dg(static_cast<size_t>(E));
      for (int64_t r = r0; r < r1; ++r) {
        if (L >= 2) relu_copy(a[L - 2] + r * E * d.li[L - 1], Rcur + r * E * d.li[L - 1], E * d.li[L - 1]);
        const T* go = g_out + r * no;
        const T* y = a[L - 1] + r * wo;
        const T* g = gate + r * E;
        T* Gr = Gp + r * wo;
        for (int64_t e = 0; e < E; ++e) {
          T s = g_gate[r * E + e];
          const T* ye = y + e * no;
          T* ge = Gr + e * no;
          T* pe = pb + e * no;
          const T w = g[e];
          for (int64_t k = 0; k < no; ++k) {
            s += go[k] * ye[k];
            const T v = w * go[k];
            ge[k] = v;
            pe[k] += v;
          }
          dg[e] = s;
        }
        T* dz = DZbuf + r * nz;
        if (nz == 1 && E == 2) {
          dz[0] = (dg[0] - dg[1]) * g[0] * g[1];
        } else {
          T s = 0;
          for (int64_t e = 0; e < E; ++e) s += g[e] * dg[e];
          for (int64_t e = 0; e < E; ++e) dz[e] = g[e] * (dg[e] - s);
        }
        for (int64_t k = 0; k < nz; ++k) pz[k] += dz[k];
      }
    });
    std::vector<T> tmp(static_cast<size_t>(wo + nz));
    reduce_partials(part, nchunks, wo + nz, tmp.data());
    std::copy(tmp.begin(), tmp.begin() + wo, db[L - 1]);
    std::copy(tmp.begin() + wo, tmp.end(), dgb[G - 1]);
  }

  // ---- gate MLP backward
  T* dzp = DZbuf;
  T* dz2 = DZ2buf;
  for (int64_t j = G - 1; j >= 0; --j) {
    const int64_t ni = d.gi[j], no = d.go[j];
    const T* inp = h;
    if (j > 0) {
      const T* zp = z[j - 1];
      T* R = Rbuf;
      for_chunks(B, nchunks, [&](int64_t, int64_t r0, int64_t r1) { relu_copy(zp + r0 * ni, R + r0 * ni, (r1 - r0) * ni); });
      inp = R;
    }
    gemm<T>(true, false, ni, no, B, inp, ni, dzp, no, T(0), dgW[j], no);  // dgW_j = inp^T dZ_j
    if (j == 0) {
      if (dh != nullptr) gemm<T>(false, true, B, ni, no, dzp, no, gW[0], no, T(0), dh, ni);  // dh = dZ_0 gW_0^T
    } else {
      gemm<T>(false, true, B, ni, no, dzp, no, gW[j], no, T(0), dz2, ni);  // dZ_{j-1} = (dZ_j gW_j^T) [z > 0]
      const T* zp = z[j - 1];
      part.assign(static_cast<size_t>(nchunks * ni), T(0));
      for_chunks(B, nchunks, [&](int64_t c, int64_t r0, int64_t r1) {
        T* p = part.data() + c * ni;
        for (int64_t r = r0; r < r1; ++r) {
          T* q = dz2 + r * ni;
          const T* zr = zp + r * ni;
          for (int64_t k = 0; k < ni; ++k) {
            const T v = zr[k] > T(0) ? q[k] : T(0);
            q[k] = v;
            p[k] += v;
          }
        }
      });
      reduce_partials(part, nchunks, ni, dgb[j - 1]);
      std::swap(dzp, dz2);
    }
  }

  // ---- experts, last layer down to layer 1
  for (int64_t l = L - 1; l >= 1; --l) {
    const int64_t ni = d.li[l], no = d.lo[l], wi = E * ni, wo = E * no;
    const T* R = Rcur;  // relu(a_{l-1})
    const bool make_next = l >= 2;  // relu(a_{l-2}) for layer l-1, in the same pass
    const int64_t wn = make_next ? E * d.li[l - 1] : 0;
    const T* An = make_next ? a[l - 2] : nullptr;
    for (int64_t e = 0; e < E; ++e) {
      gemm<T>(true, false, ni, no, B, R + e * ni, wi, Gp + e * no, wo, T(0), dW[l] + e * ni * no, no);  // R_e^T G_e
      gemm<T>(false, true, B, ni, no, Gp + e * no, wo, W[l] + e * ni * no, no, T(0), Dp + e * ni, wi);  // G_e W_e^T
    }
    const bool res = l <= d.nres;  // then wi == wo
    part.assign(static_cast<size_t>(nchunks * wi), T(0));
    for_chunks(B, nchunks, [&](int64_t c, int64_t r0, int64_t r1) {
      T* p = part.data() + c * wi;
      for (int64_t r = r0; r < r1; ++r) {
        if (make_next) relu_copy(An + r * wn, Rnext + r * wn, wn);
        T* q = Dp + r * wi;
        const T* rr = R + r * wi;
        if (res) {
          const T* gr = Gp + r * wo;
          for (int64_t k = 0; k < wi; ++k) {
            const T v = gr[k] + (rr[k] > T(0) ? q[k] : T(0));
            q[k] = v;
            p[k] += v;
          }
        } else {
          for (int64_t k = 0; k < wi; ++k) {
            const T v = rr[k] > T(0) ? q[k] : T(0);
            q[k] = v;
            p[k] += v;
          }
        }
      }
    });
    reduce_partials(part, nchunks, wi, db[l - 1]);
    std::swap(Gp, Dp);
    if (make_next) std::swap(Rcur, Rnext);
  }

  // ---- layer 0: dW_0[e] = h^T G_e ; dh += G W0cat^T
  {
    const int64_t no = d.lo[0], wo = E * no;
    for (int64_t e = 0; e < E; ++e) gemm<T>(true, false, d.in, no, B, h, d.in, Gp + e * no, wo, T(0), dW[0] + e * d.in * no, no);
    if (dh != nullptr) gemm<T>(false, true, B, d.in, wo, Gp, wo, W0cat, wo, T(1), dh, d.in);
  }
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
bwd_common(const Tensor& g_out_, const Tensor& g_gate_, const Tensor& h_, TensorList Ws_, TensorList bs_,
           TensorList gWs_, TensorList gbs_, int64_t n_residual, TensorList saved_, const Tensor& gate_, bool need_dh) {
  TORCH_CHECK(h_.device().is_cpu(), "gated_experts_bwd (cpu): h must be a CPU tensor");
  TORCH_CHECK(h_.scalar_type() == at::kFloat || h_.scalar_type() == at::kDouble,
              "gated_experts_bwd (cpu): float32 or float64 only, got ", h_.scalar_type());
  const Dims d = dims_of(h_, Ws_, bs_, gWs_, gbs_, n_residual);
  TORCH_CHECK(static_cast<int64_t>(saved_.size()) == d.L + d.G, "gated_experts_bwd: saved must hold L + G tensors");
  TORCH_CHECK(g_out_.dim() == 2 && g_out_.size(0) == d.B && g_out_.size(1) == d.out, "gated_experts_bwd: g_out must be (B, out)");
  TORCH_CHECK(g_gate_.dim() == 2 && g_gate_.size(0) == d.B && g_gate_.size(1) == d.E, "gated_experts_bwd: g_gate must be (B, E)");
  for (int64_t l = 0; l < d.L; ++l)
    TORCH_CHECK(saved_[l].numel() == d.B * d.E * d.lo[l], "gated_experts_bwd: saved[", l, "] must be (B, E, out_l)");
  for (int64_t j = 0; j < d.G; ++j)
    TORCH_CHECK(saved_[d.L + j].numel() == d.B * d.go[j], "gated_experts_bwd: saved[", d.L + j, "] must be (B, out_j)");
  Tensor h = h_.contiguous(), g_out = g_out_.contiguous().to(h.scalar_type()),
         g_gate = g_gate_.contiguous().to(h.scalar_type()), gate = gate_.contiguous();
  auto Ws = contig(Ws_), bs = contig(bs_), gWs = contig(gWs_), gbs = contig(gbs_), saved = contig(saved_);
  Tensor dh = need_dh ? at::empty_like(h) : at::empty({0}, h.options());
  std::vector<Tensor> dWs, dbs, dgWs, dgbs;
  for (int64_t l = 0; l < d.L; ++l) {
    dWs.push_back(at::empty_like(Ws[l]));
    dbs.push_back(at::empty_like(bs[l]));
  }
  for (int64_t j = 0; j < d.G; ++j) {
    dgWs.push_back(at::empty_like(gWs[j]));
    dgbs.push_back(at::empty_like(gbs[j]));
  }
  if (d.B == 0) {
    for (auto* v : {&dWs, &dbs, &dgWs, &dgbs})
      for (auto& t : *v) t.zero_();
    return {dh, dWs, dbs, dgWs, dgbs};
  }
  Tensor W0cat = need_dh ? Ws[0].permute({1, 0, 2}).reshape({d.in, d.E * d.lo[0]}).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gated_experts_bwd_cpu", [&] {
    using T = scalar_t;
    std::vector<const T*> W, gW, a, z;
    std::vector<T*> dW, db, dgW, dgb;
    for (int64_t l = 0; l < d.L; ++l) {
      W.push_back(Ws[l].data_ptr<T>());
      a.push_back(saved[l].data_ptr<T>());
      dW.push_back(dWs[l].data_ptr<T>());
      db.push_back(dbs[l].data_ptr<T>());
    }
    for (int64_t j = 0; j < d.G; ++j) {
      gW.push_back(gWs[j].data_ptr<T>());
      z.push_back(saved[d.L + j].data_ptr<T>());
      dgW.push_back(dgWs[j].data_ptr<T>());
      dgb.push_back(dgbs[j].data_ptr<T>());
    }
    backward_impl<T>(d, g_out.data_ptr<T>(), g_gate.data_ptr<T>(), h.data_ptr<T>(), W,
                     need_dh ? W0cat.data_ptr<T>() : nullptr, gW, a, z, gate.data_ptr<T>(),
                     need_dh ? dh.data_ptr<T>() : nullptr, dW, db, dgW, dgb);
  });
  return {dh, dWs, dbs, dgWs, dgbs};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
gated_experts_bwd_cpu(const Tensor& g_out, const Tensor& g_gate, const Tensor& h, TensorList Ws, TensorList bs,
                      TensorList gWs, TensorList gbs, int64_t n_residual, TensorList saved, const Tensor& gate) {
  return bwd_common(g_out, g_gate, h, Ws, bs, gWs, gbs, n_residual, saved, gate, true);
}

// The parameters' gradients only (h does not require grad, e.g. a fixed embedding): skips the two dh GEMMs.
std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
gated_experts_bwd_params_cpu(const Tensor& g_out, const Tensor& g_gate, const Tensor& h, TensorList Ws, TensorList bs,
                             TensorList gWs, TensorList gbs, int64_t n_residual, TensorList saved, const Tensor& gate) {
  auto r = bwd_common(g_out, g_gate, h, Ws, bs, gWs, gbs, n_residual, saved, gate, false);
  return {std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r)};
}

}  // namespace
}  // namespace gated
}  // namespace moekernels

TORCH_LIBRARY_IMPL(moekernels, CPU, m) {
  m.impl("gated_experts_fwd", &moekernels::gated::gated_experts_fwd_cpu);
  m.impl("gated_experts_bwd", &moekernels::gated::gated_experts_bwd_cpu);
  m.impl("gated_experts_infer", &moekernels::gated::gated_experts_infer_cpu);
  m.impl("gated_experts_bwd_params", &moekernels::gated::gated_experts_bwd_params_cpu);
}
