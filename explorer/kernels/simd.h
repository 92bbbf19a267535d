// Vector helpers shared by the CPU kernels (attend.cpp, decode.cpp): 16-float vectors in
// GCC/Clang's vector extension and a vectorised exp. Header-only, internal linkage.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace explorer_simd {
namespace {

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
#ifdef __AVX512F__
// one vbroadcastss (the generic form below costs an add and a shuffle)
inline f16v splat(float x) { return reinterpret_cast<f16v>(_mm512_set1_ps(x)); }
#else
inline f16v splat(float x) { return f16v{} + x; }
#endif

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

// sigmoid(x) from exp of a non-positive argument only: e = exp(-|x|), then 1 / (1 + e) for
// x >= 0 and e / (1 + e) below (no overflow at either end).
inline f16v sigmoid(f16v x) {
  const f16v neg = x < 0 ? x : -x;
  const f16v e = exp_nonpositive(neg);
  const f16v one = splat(1.f);
  return x >= 0 ? one / (one + e) : e / (one + e);
}

// Softmax of one row x[0, n) in place. With `mean`, also mean[j] (=|+=) p[j] * w. If
// `normalise` is false the row is left as exp(x - max) (the caller scales `@ v` instead).
// Returns 1 / sum.
inline float softmax_row(float* x, int64_t n, float* mean, bool first, float w, bool normalise) {
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

}  // namespace
}  // namespace explorer_simd
