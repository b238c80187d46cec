// Compiled with -mavx2 -mfma; called only after cpu_has_avx2().
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "float_kernels.hpp"

namespace osengine::runtime::detail {

float dot_avx2(const float* a, const float* b, std::int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
         acc3 = _mm256_setzero_ps();
  std::int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  const __m256 sum8 = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  const __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
  const __m128 sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
  float acc = _mm_cvtss_f32(_mm_add_ss(sum2, _mm_shuffle_ps(sum2, sum2, 1)));
  for (; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

void axpy_avx2(float alpha, const float* x, float* y, std::int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

namespace {

// The 8 sums of 8 vectors: lane k of the result is the sum of the lanes of v[k].
inline __m256 sum8x8(const __m256 (&v)[8]) {
  const __m256 a01 = _mm256_hadd_ps(v[0], v[1]), a23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 a45 = _mm256_hadd_ps(v[4], v[5]), a67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 b0123 = _mm256_hadd_ps(a01, a23), b4567 = _mm256_hadd_ps(a45, a67);
  // b0123 = [s0 s1 s2 s3 | s0' s1' s2' s3'] (low / high 128-bit halves of each sum), likewise b4567
  const __m256 lo = _mm256_permute2f128_ps(b0123, b4567, 0x20), hi = _mm256_permute2f128_ps(b0123, b4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

}  // namespace

void attend_avx2(const float* q, const float* keys, const float* values, int n_keys, std::int64_t hd, float scale,
                 float* scores, float* out) {
  if (hd % 8 != 0) {
    attend_scalar(q, keys, values, n_keys, hd, scale, scores, out);
    return;
  }
  // scores, eight keys at a time (one accumulator per key, reduced together)
  const __m256 vscale = _mm256_set1_ps(scale);
  int j = 0;
  for (; j + 8 <= n_keys; j += 8) {
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    for (std::int64_t i = 0; i < hd; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + (j + k) * hd + i), acc[k]);
    }
    _mm256_storeu_ps(scores + j, _mm256_mul_ps(sum8x8(acc), vscale));
  }
  for (; j < n_keys; ++j) scores[j] = dot_avx2(q, keys + j * hd, hd) * scale;
  float max_score = -INFINITY;
  for (j = 0; j < n_keys; ++j) max_score = std::max(max_score, scores[j]);
  float total = 0.0f;
  for (j = 0; j < n_keys; ++j) {
    scores[j] = std::exp(scores[j] - max_score);
    total += scores[j];
  }
  const __m256 vtotal = _mm256_set1_ps(total);
  for (j = 0; j + 8 <= n_keys; j += 8) _mm256_storeu_ps(scores + j, _mm256_div_ps(_mm256_loadu_ps(scores + j), vtotal));
  for (; j < n_keys; ++j) scores[j] /= total;
  // out = sum_j p_j V_j, 64 outputs at a time held in registers
  for (std::int64_t i0 = 0; i0 < hd; i0 += 64) {
    const int width = static_cast<int>(std::min<std::int64_t>(64, hd - i0)) / 8;
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
    for (j = 0; j < n_keys; ++j) {
      const __m256 p = _mm256_set1_ps(scores[j]);
      const float* v = values + j * hd + i0;
      for (int c = 0; c < width; ++c) acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * c), acc[c]);
    }
    for (int c = 0; c < width; ++c) _mm256_storeu_ps(out + i0 + 8 * c, acc[c]);
  }
}

}  // namespace osengine::runtime::detail
