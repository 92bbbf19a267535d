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

#include "simd.h"

// MKL's Fortran sgemm, exported by libtorch_cpu (LP64 integers).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

using namespace explorer_simd;

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
