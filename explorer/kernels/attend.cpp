// Attention that also yields its probabilities, fused per block of query rows (CPU, float32).
//
// For each image and block of R query rows, head by head:
//   S = q_blk kᵀ (MKL sgemm) -> softmax in place (one pass for the row max, one for exp and
//   sum, one that normalises and adds the head-mean share) -> out_blk = P v (MKL sgemm).
// The block (R x N floats) stays in L2 from the first GEMM to the second, and each block of
// the head mean gets all its heads' shares while it is in L2 too. Blocks are spread over
// ATen's OpenMP threads; inside a parallel region MKL runs on the calling thread.
//
// Probabilities below exp(-75) relative to the row maximum (< 3e-33) are written as exactly
// zero: they are far below float precision of the row's mass, and denormal floats would make
// the second GEMM several times slower (measured on Gaussian-noise input).
//
// Built on first use by explorer/kernels/__init__.py (torch.utils.cpp_extension); Python
// falls back to plain PyTorch ops when no compiler is available.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

// MKL's Fortran sgemm, exported by libtorch_cpu (LP64 integers).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

// Row-major C[M, N] = A[M, K] @ B, where B is [K, N] (ldb) or, if b_rows_are_n, Bt[N, K] (ldb).
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, bool b_rows_are_n, float* C, int64_t ldc) {
  // Column-major view: C^T[N, M] = op(B)^T @ A^T.
  const char ta = b_rows_are_n ? 'T' : 'N', tb = 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1.f, zero = 0.f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &zero, C, &lc);
}

// 16 floats: GCC/Clang vector extension, lowered to whatever the target has (AVX-512: one
// register; AVX2: two; SSE/NEON: four).
typedef float f16v __attribute__((vector_size(64)));
typedef int i16v __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline f16v load(const float* p) {
  f16v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, f16v v) { std::memcpy(p, &v, sizeof v); }
inline f16v splat(float x) { return f16v{} + x; }

// Lanes [0, n) of p, the rest `fill`.
inline f16v load_tail(const float* p, int64_t n, float fill) {
  alignas(64) float tmp[kLanes];
  for (int i = 0; i < kLanes; ++i) tmp[i] = i < n ? p[i] : fill;
  return load(tmp);
}
inline void store_tail(float* p, f16v v, int64_t n) {
  alignas(64) float tmp[kLanes];
  store(tmp, v);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}

constexpr float kCut = -75.f;  // exp(x) for x < kCut is written as 0

// exp(x) for x <= 0 (Cephes expf: relative error ~1e-7), 0 below kCut.
inline f16v exp_nonpositive(f16v x) {
  const f16v xc = x < kCut ? splat(kCut) : x;
  const f16v magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const f16v t = xc * 1.44269504088896341f + magic;
  const f16v n = t - magic;
  const i16v ni = reinterpret_cast<i16v>(t) - reinterpret_cast<i16v>(magic);
  f16v r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f16v p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const f16v scale = reinterpret_cast<f16v>((ni + 127) << 23);
  const f16v e = p * scale;
  return x < kCut ? f16v{} : e;
}

inline float hmax(f16v v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}
inline float hsum(f16v v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Softmax of one row x[0, n) in place. With `mean`, also mean[j] (=|+=) p[j] * w. If
// `normalise` is false the row is left as exp(x - max) (the caller scales `@ v` instead).
// Returns 1 / sum.
float softmax_row(float* x, int64_t n, float* mean, bool first, float w, bool normalise) {
  const int64_t full = n - n % kLanes, tail = n - full;
  f16v vmax = splat(-INFINITY);
  for (int64_t j = 0; j < full; j += kLanes) {
    const f16v v = load(x + j);
    vmax = v > vmax ? v : vmax;
  }
  float m = hmax(vmax);
  for (int64_t j = full; j < n; ++j) m = std::max(m, x[j]);
  const f16v vm = splat(m);
  f16v vsum{};
  for (int64_t j = 0; j < full; j += kLanes) {
    const f16v e = exp_nonpositive(load(x + j) - vm);
    store(x + j, e);
    vsum += e;
  }
  if (tail) {
    const f16v e = exp_nonpositive(load_tail(x + full, tail, -INFINITY) - vm);
    store_tail(x + full, e, tail);
    vsum += e;
  }
  const float inv = 1.f / hsum(vsum);
  if (mean == nullptr && !normalise) return inv;
  const f16v vinv = splat(inv), vshare = splat(inv * w);
  for (int64_t j = 0; j < full; j += kLanes) {
    const f16v e = load(x + j);
    if (mean != nullptr) store(mean + j, first ? e * vshare : load(mean + j) + e * vshare);
    if (normalise) store(x + j, e * vinv);
  }
  for (int64_t j = full; j < n; ++j) {
    const float e = x[j];
    if (mean != nullptr) mean[j] = first ? e * (inv * w) : mean[j] + e * (inv * w);
    if (normalise) x[j] = e * inv;
  }
  return inv;
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name,
              " must be a float32 CPU tensor");
}

// q (B, H, N, d) with unit stride in d (already scaled); k (B, H, N, d) with unit stride in
// d or in N; v (B, H, N, d) with unit stride in d; probs (B, H, N, N) contiguous, receives
// the probabilities if given; mean (B, N, N) contiguous, receives their mean over heads if
// given; block_rows: query rows per block. Returns the output (B, N, H, d), contiguous.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& probs_opt,
                  const std::optional<at::Tensor>& mean_opt, int64_t block_rows) {
  check_float_cpu(q, "q");
  check_float_cpu(k, "k");
  check_float_cpu(v, "v");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "q, k, v must share one (B, H, N, d) shape");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  TORCH_CHECK(q.stride(3) == 1 && v.stride(3) == 1, "q and v need unit stride in head_dim");
  const bool k_rows = k.stride(3) == 1;
  TORCH_CHECK(k_rows || k.stride(2) == 1, "k needs unit stride in head_dim or in tokens");
  float* probs = nullptr;
  if (probs_opt.has_value() && probs_opt->defined()) {
    check_float_cpu(*probs_opt, "probs");
    TORCH_CHECK(probs_opt->is_contiguous() && probs_opt->sizes() == at::IntArrayRef({B, H, N, N}),
                "probs must be contiguous (B, H, N, N)");
    probs = probs_opt->data_ptr<float>();
  }
  float* mean = nullptr;
  if (mean_opt.has_value() && mean_opt->defined()) {
    check_float_cpu(*mean_opt, "mean");
    TORCH_CHECK(mean_opt->is_contiguous() && mean_opt->sizes() == at::IntArrayRef({B, N, N}),
                "mean must be contiguous (B, N, N)");
    mean = mean_opt->data_ptr<float>();
  }
  at::Tensor out = at::empty({B, N, H, d}, q.options());
  if (B == 0 || N == 0) return out;
  float* o = out.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t R = std::clamp<int64_t>(block_rows, 1, N);
  const int64_t blocks = (N + R - 1) / R;
  const float w = 1.f / static_cast<float>(H);
  const int64_t ldk = k_rows ? k.stride(2) : k.stride(3);

  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(probs == nullptr ? R * N : 0);
    std::vector<float> inv(R);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, r0 = (task % blocks) * R, rows = std::min(R, N - r0);
      float* mean_blk = mean != nullptr ? mean + (b * N + r0) * N : nullptr;
      for (int64_t h = 0; h < H; ++h) {
        const float* qb = qp + b * q.stride(0) + h * q.stride(1) + r0 * q.stride(2);
        const float* kb = kp + b * k.stride(0) + h * k.stride(1);
        const float* vb = vp + b * v.stride(0) + h * v.stride(1);
        float* s = probs != nullptr ? probs + ((b * H + h) * N + r0) * N : scratch.data();
        gemm(rows, N, d, qb, q.stride(2), kb, ldk, k_rows, s, N);
        const bool normalise = probs != nullptr;
        for (int64_t i = 0; i < rows; ++i) {
          inv[i] = softmax_row(s + i * N, N, mean_blk ? mean_blk + i * N : nullptr, h == 0, w,
                               normalise);
        }
        float* ob = o + (b * N + r0) * H * d + h * d;
        gemm(rows, d, N, s, N, vb, v.stride(2), false, ob, H * d);
        if (!normalise) {  // rows of s were exp(x - max): scale the output rows instead
          for (int64_t i = 0; i < rows; ++i) {
            float* row = ob + i * H * d;
            for (int64_t j = 0; j < d; ++j) row[j] *= inv[i];
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(explorer_kernels, m) {
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor? probs, Tensor? mean, int block_rows)"
        " -> Tensor");
  m.impl("attend", c10::DispatchKey::CPU, TORCH_FN(attend));
}
