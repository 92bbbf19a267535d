// One decode step of an ImageGPT for the rows of many completions at once (CPU, float32).
//
// Rows come in groups: a group is one request's samples of one image, all at the same
// position, sharing the keys/values of the known pixels (the prefix, prefilled once by
// PyTorch) and each holding its own keys/values after them. One call runs every layer for
// every row: each weight matrix is read once per step for all rows (column tiles outside,
// row tiles inside, so a tile of weights is reused from L1/L2), and each group's prefix is
// read once for its rows (blocks of keys outside, the group's rows inside).
//
// A row's arithmetic does not depend on what else is in the batch: the matrix products
// accumulate over the input dimension in one fixed order with the same instructions for
// every row (rows go through one tile kernel of kRowTile rows; the batch is padded with zero
// rows), and attention reads only the row's own group. So a request's logits are bit for bit
// the same alone or batched with others (tests/test_igpt_batch.py checks it), which is what
// lets requests join and leave a running batch without changing anyone's samples.
//
// Layouts (float32, contiguous; "packed" = as `gemm` below reads a (K, N) matrix):
//   weights   [wte (vocab, C), wpe (n_pos, C), ln_f (C), head (C, Vp) packed], then per
//             layer [ln_1 (C), w_attn (C, 3C) packed, b_attn (3C), w_proj (C, C) packed,
//             b_proj (C), ln_2 (C), w_fc (C, I) packed, b_fc (I), w_out (I, C) packed,
//             b_out (C)]; GPT-2 `Conv1D` matrices are (in, out); Vp = V rounded up to 16
//   k_pre[g]  (L, nh, ceil(P/16), hs, 16) the prefix's keys in blocks of 16 positions, each
//             block transposed (a query's scores for 16 keys are hs multiply-adds of one
//             vector), zero-padded; v_pre[g] (L, nh, P, hs)
//   k_own[g]  (L, n, nh, ceil(T/16), hs, 16) each row's own keys, blocked the same way;
//             v_own[g] (L, n, nh, T, hs)
//   group_rows[g] = n (the groups' rows are consecutive, in order); group_pos[g] = the
//   position of this step's input token, >= P; its keys/values go to own slot pos - P.
//
// Built with attend.cpp by explorer/kernels/__init__.py; explorer/igpt/batch.py calls it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace {

using namespace explorer_simd;

constexpr int64_t kRowTile = 4;     // rows per GEMM tile (the batch is padded to a multiple)
constexpr int64_t kKeyBlock = 128;  // keys per block of scores/values (16 KB of keys at hs 32)
constexpr int kWeightsPerLayer = 10;
constexpr int64_t kParallelRows = 4;  // fewer rows than this stay on one thread

// C[r, :] (=|+=) A[r, :] @ W + bias for the kRowTile rows at A, over NV * 16 columns.
template <int NV>
inline void gemm_tile(const float* A, int64_t lda, const float* W, int64_t ldw, int64_t K,
                      const float* bias, float* C, int64_t ldc, bool accumulate) {
  f16v acc[kRowTile][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    f16v w[NV];
    for (int c = 0; c < NV; ++c) w[c] = load(W + k * ldw + c * kLanes);
    for (int64_t r = 0; r < kRowTile; ++r) {
      const f16v a = splat(A[r * lda + k]);
      for (int c = 0; c < NV; ++c) acc[r][c] += a * w[c];
    }
  }
  for (int64_t r = 0; r < kRowTile; ++r) {
    for (int c = 0; c < NV; ++c) {
      float* out = C + r * ldc + c * kLanes;
      const f16v y = bias != nullptr ? acc[r][c] + load(bias + c * kLanes) : acc[r][c];
      store(out, accumulate ? load(out) + y : y);
    }
  }
}

// C (M, N) (=|+=) A (M, K) @ W + bias, M a multiple of kRowTile. W (K, N), N a multiple of
// 16, is packed in column tiles of 64 (then of 16), each tile's K rows contiguous: tile t
// starting at column n0 begins at W + K * n0 and streams in one sequential run.
void gemm(const float* A, int64_t lda, int64_t M, const float* W, int64_t K, int64_t N,
          const float* bias, float* C, int64_t ldc, bool accumulate) {
  constexpr int64_t kWide = 4 * kLanes;
  const int64_t wide = N / kWide, narrow = (N - wide * kWide) / kLanes;
  const int64_t tiles = wide + narrow;
  at::parallel_for(0, tiles, M >= kParallelRows ? 1 : tiles, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n0 = t < wide ? t * kWide : wide * kWide + (t - wide) * kLanes;
      const float* bt = bias != nullptr ? bias + n0 : nullptr;
      const float* wt = W + K * n0;
      const int64_t ldw = t < wide ? kWide : kLanes;
      for (int64_t r = 0; r < M; r += kRowTile) {
        if (t < wide) {
          gemm_tile<4>(A + r * lda, lda, wt, ldw, K, bt, C + r * ldc + n0, ldc, accumulate);
        } else {
          gemm_tile<1>(A + r * lda, lda, wt, ldw, K, bt, C + r * ldc + n0, ldc, accumulate);
        }
      }
    }
  });
}

// ImageGPT's "LayerNorm" (RMSNorm): out = x / sqrt(mean(x^2) + eps) * w, row by row.
void rms_norm(const float* x, int64_t rows, int64_t C, const float* w, double eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * C;
    f16v ss{};
    for (int64_t c = 0; c < C; c += kLanes) ss += load(xr + c) * load(xr + c);
    const float inv = 1.f / std::sqrt(hsum(ss) / static_cast<float>(C) + static_cast<float>(eps));
    for (int64_t c = 0; c < C; c += kLanes) {
      store(out + r * C + c, load(xr + c) * inv * load(w + c));
    }
  }
}

// In place: u * sigmoid(1.702 u), OpenAI's iGPT activation ("quick_gelu").
void quick_gelu(float* u, int64_t n) {
  for (int64_t i = 0; i < n; i += kLanes) {
    const f16v x = load(u + i);
    store(u + i, x * sigmoid(x * 1.702f));
  }
}

// s[j] = q . key j for j in [0, n): keys in blocks of 16, each block (hs, 16) (zero-padded).
void scores(const float* q, int64_t hs, const float* kb, int64_t n, float* s) {
  const int64_t block = hs * kLanes;
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
    const float* k0 = kb + (j / kLanes) * block;
    f16v acc[4] = {};
    for (int64_t d = 0; d < hs; ++d) {
      const f16v qd = splat(q[d]);
      for (int c = 0; c < 4; ++c) acc[c] += qd * load(k0 + c * block + d * kLanes);
    }
    for (int c = 0; c < 4; ++c) store(s + j + c * kLanes, acc[c]);
  }
  for (; j < n; j += kLanes) {
    const float* k0 = kb + (j / kLanes) * block;
    f16v acc{};
    for (int64_t d = 0; d < hs; ++d) acc += splat(q[d]) * load(k0 + d * kLanes);
    store_tail(s + j, acc, std::min<int64_t>(kLanes, n - j));
  }
}

// acc[0, NV * 16) += sum over j in [0, n) of p[j] * v[j, :].
template <int NV>
void weighted_sum_n(const float* p, const float* v, int64_t n, float* acc) {
  constexpr int64_t hs = NV * kLanes;
  f16v a[NV];
  for (int c = 0; c < NV; ++c) a[c] = load(acc + c * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    const f16v pj = splat(p[j]);
    for (int c = 0; c < NV; ++c) a[c] += pj * load(v + j * hs + c * kLanes);
  }
  for (int c = 0; c < NV; ++c) store(acc + c * kLanes, a[c]);
}

// acc[0, hs) += sum over j in [0, n) of p[j] * v[j, :], v rows of hs floats.
void weighted_sum(const float* p, const float* v, int64_t n, int64_t hs, float* acc) {
  switch (hs) {
    case 16: return weighted_sum_n<1>(p, v, n, acc);
    case 32: return weighted_sum_n<2>(p, v, n, acc);
    case 64: return weighted_sum_n<4>(p, v, n, acc);
    case 128: return weighted_sum_n<8>(p, v, n, acc);
    default:
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t d = 0; d < hs; ++d) acc[d] += p[j] * v[j * hs + d];
      }
  }
}

struct Group {
  int64_t row0, rows, pos, prefix, own_len;
  const float *k_pre, *v_pre;
  float *k_own, *v_own;
};

// One layer's attention for one group and head: write the rows' new keys/values at their own
// slot, then softmax(q k^T / sqrt(hs)) v over the prefix and the row's own positions.
void attend_group(const Group& g, int64_t layer, int64_t h, int64_t nh, int64_t hs,
                  const float* qkv, int64_t C, float* att, std::vector<float>& buf) {
  const int64_t slot = g.pos - g.prefix, total = g.prefix + slot + 1, n = g.rows;
  const int64_t P = g.prefix, T = g.own_len;
  const int64_t pre_blocks = (P + kLanes - 1) / kLanes, own_blocks = (T + kLanes - 1) / kLanes;
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
  buf.assign(n * (total + 2 * hs), 0.f);
  float* S = buf.data();               // (n, total) scores, then probabilities
  float* Q = S + n * total;            // (n, hs) scaled queries
  float* O = Q + n * hs;               // (n, hs) outputs before normalising
  const float* kb_pre = g.k_pre + (layer * nh + h) * pre_blocks * hs * kLanes;
  const float* v_pre = g.v_pre + (layer * nh + h) * P * hs;
  for (int64_t i = 0; i < n; ++i) {
    const float* row = qkv + (g.row0 + i) * 3 * C + h * hs;
    float* kb = g.k_own + ((layer * n + i) * nh + h) * own_blocks * hs * kLanes +
                (slot / kLanes) * hs * kLanes + slot % kLanes;
    float* v = g.v_own + ((layer * n + i) * nh + h) * T * hs;
    for (int64_t d = 0; d < hs; ++d) {
      Q[i * hs + d] = row[d] * scale;
      kb[d * kLanes] = row[C + d];
      v[slot * hs + d] = row[2 * C + d];
    }
  }
  for (int64_t j = 0; j < P; j += kKeyBlock) {  // the prefix's keys: once per block, all rows
    const int64_t m = std::min(kKeyBlock, P - j);
    const float* kb = kb_pre + (j / kLanes) * hs * kLanes;
    for (int64_t i = 0; i < n; ++i) scores(Q + i * hs, hs, kb, m, S + i * total + j);
  }
  std::vector<float> inv(n);
  for (int64_t i = 0; i < n; ++i) {
    const float* kb = g.k_own + ((layer * n + i) * nh + h) * own_blocks * hs * kLanes;
    scores(Q + i * hs, hs, kb, slot + 1, S + i * total + P);
    inv[i] = softmax_row(S + i * total, total, nullptr, false, 0.f, false);
  }
  for (int64_t j = 0; j < P; j += kKeyBlock) {
    const int64_t m = std::min(kKeyBlock, P - j);
    for (int64_t i = 0; i < n; ++i) {
      weighted_sum(S + i * total + j, v_pre + j * hs, m, hs, O + i * hs);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* v = g.v_own + ((layer * n + i) * nh + h) * T * hs;
    weighted_sum(S + i * total + P, v, slot + 1, hs, O + i * hs);
    float* out = att + (g.row0 + i) * C + h * hs;
    for (int64_t d = 0; d < hs; ++d) out[d] = O[i * hs + d] * inv[i];
  }
}

const float* fptr(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), what,
              " must be a contiguous float32 CPU tensor");
  return t.data_ptr<float>();
}

at::Tensor decode_step(const at::Tensor& tokens, at::TensorList weights, at::TensorList k_pre,
                       at::TensorList v_pre, at::TensorList k_own, at::TensorList v_own,
                       at::IntArrayRef group_rows, at::IntArrayRef group_pos, int64_t n_head,
                       double eps, int64_t n_out) {
  TORCH_CHECK(tokens.device().is_cpu() && tokens.scalar_type() == at::kLong && tokens.dim() == 1,
              "tokens must be a 1-D int64 CPU tensor");
  const int64_t G = static_cast<int64_t>(group_rows.size());
  TORCH_CHECK(group_pos.size() == group_rows.size() && k_pre.size() == group_rows.size() &&
                  v_pre.size() == group_rows.size() && k_own.size() == group_rows.size() &&
                  v_own.size() == group_rows.size(),
              "one prefix, own cache, row count and position per group");
  TORCH_CHECK(weights.size() >= 4 && (weights.size() - 4) % kWeightsPerLayer == 0,
              "weights: wte, wpe, ln_f, head_t, then 10 per layer");
  const int64_t L = (static_cast<int64_t>(weights.size()) - 4) / kWeightsPerLayer;
  const at::Tensor &wte = weights[0], &wpe = weights[1], &head = weights[3];
  const int64_t C = wte.size(1), I = weights[4 + 7].numel(), Vp = head.numel() / C;
  TORCH_CHECK(C % kLanes == 0 && I % kLanes == 0 && Vp % kLanes == 0 && C % n_head == 0 &&
                  n_out <= Vp && head.numel() == C * Vp,
              "widths must be multiples of 16 and of the head count");
  for (int64_t l = 0; l < L; ++l) {
    const int64_t sizes[kWeightsPerLayer] = {C, C * 3 * C, 3 * C, C * C, C, C, C * I, I, I * C, C};
    for (int i = 0; i < kWeightsPerLayer; ++i) {
      TORCH_CHECK(weights[4 + l * kWeightsPerLayer + i].numel() == sizes[i],
                  "layer weights must have the model's sizes");
    }
  }
  const int64_t hs = C / n_head, B = tokens.size(0);
  std::vector<Group> groups(G);
  int64_t row = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n = group_rows[g];
    const int64_t P = v_pre[g].dim() == 4 ? v_pre[g].size(2) : 0;
    const int64_t T = v_own[g].dim() == 5 ? v_own[g].size(3) : 0;
    const int64_t pb = (P + kLanes - 1) / kLanes, tb = (T + kLanes - 1) / kLanes;
    TORCH_CHECK(v_pre[g].sizes() == at::IntArrayRef({L, n_head, P, hs}) &&
                    k_pre[g].sizes() == at::IntArrayRef({L, n_head, pb, hs, kLanes}),
                "prefix caches must be keys (L, nh, ceil(P/16), hs, 16), values (L, nh, P, hs)");
    TORCH_CHECK(v_own[g].sizes() == at::IntArrayRef({L, n, n_head, T, hs}) &&
                    k_own[g].sizes() == at::IntArrayRef({L, n, n_head, tb, hs, kLanes}),
                "own caches must be keys (L, n, nh, ceil(T/16), hs, 16), values (L, n, nh, T, hs)");
    TORCH_CHECK(group_pos[g] >= P && group_pos[g] - P < T && group_pos[g] < wpe.size(0),
                "a group's position must lie after its prefix, inside its own cache");
    groups[g] = {row, n, group_pos[g], P, T, fptr(k_pre[g], "k_pre"), fptr(v_pre[g], "v_pre"),
                 const_cast<float*>(fptr(k_own[g], "k_own")),
                 const_cast<float*>(fptr(v_own[g], "v_own"))};
    row += n;
  }
  TORCH_CHECK(row == B, "the groups' rows must add up to the tokens");
  std::vector<const float*> w(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) w[i] = fptr(weights[i], "weights");

  const int64_t Bp = (B + kRowTile - 1) / kRowTile * kRowTile;  // zero rows pad the last tile
  std::vector<float> x(Bp * C, 0.f), h(Bp * C, 0.f), qkv(Bp * 3 * C, 0.f), att(Bp * C, 0.f),
      u(Bp * I, 0.f), logits(Bp * Vp, 0.f);
  const at::Tensor tokens_c = tokens.contiguous();
  const int64_t* tok = tokens_c.data_ptr<int64_t>();
  for (const Group& g : groups) {
    for (int64_t i = 0; i < g.rows; ++i) {
      const int64_t r = g.row0 + i;
      TORCH_CHECK(tok[r] >= 0 && tok[r] < wte.size(0), "token id out of range");
      for (int64_t c = 0; c < C; ++c) x[r * C + c] = w[0][tok[r] * C + c] + w[1][g.pos * C + c];
    }
  }
  for (int64_t l = 0; l < L; ++l) {
    const float* const* p = w.data() + 4 + l * kWeightsPerLayer;
    rms_norm(x.data(), Bp, C, p[0], eps, h.data());
    gemm(h.data(), C, Bp, p[1], C, 3 * C, p[2], qkv.data(), 3 * C, false);
    at::parallel_for(0, G * n_head, B >= kParallelRows ? 1 : G * n_head, [&](int64_t b, int64_t e) {
      std::vector<float> buf;
      for (int64_t t = b; t < e; ++t) {
        attend_group(groups[t / n_head], l, t % n_head, n_head, hs, qkv.data(), C, att.data(), buf);
      }
    });
    gemm(att.data(), C, Bp, p[3], C, C, p[4], x.data(), C, true);
    rms_norm(x.data(), Bp, C, p[5], eps, h.data());
    gemm(h.data(), C, Bp, p[6], C, I, p[7], u.data(), I, false);
    quick_gelu(u.data(), Bp * I);
    gemm(u.data(), I, Bp, p[8], I, C, p[9], x.data(), C, true);
  }
  rms_norm(x.data(), Bp, C, w[2], eps, h.data());
  gemm(h.data(), C, Bp, w[3], C, Vp, nullptr, logits.data(), Vp, false);
  at::Tensor out = at::empty({B, n_out}, tokens.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < B; ++r) std::copy_n(logits.data() + r * Vp, n_out, o + r * n_out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(explorer_kernels, m) {
  m.def("decode_step(Tensor tokens, Tensor[] weights, Tensor[] k_pre, Tensor[] v_pre, "
        "Tensor(a!)[] k_own, Tensor(b!)[] v_own, int[] group_rows, int[] group_pos, "
        "int n_head, float eps, int n_out) -> Tensor");
  m.impl("decode_step", c10::DispatchKey::CPU, TORCH_FN(decode_step));
}
