// Compiled with -mavx2 -mfma; called only after cpu_has_avx2(). exp in the softmax is osengine's exp_approx (the
// engine's, core/float_math.hpp), lane by lane the scalar version's.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "backends/avx2/float_math_avx2.hpp"
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

// Scores of R queries against NB blocks of 8 keys (blocked layout, see key_offset): two FMA chains per query and
// block (even / odd i), so that a row's score does not depend on R or NB; s[r][b * 8 + lane].
template <int R, int NB>
inline void score_blocks(const float* const* q, const float* kblock, std::int64_t hd, float scale, float* const* s) {
  __m256 even[R][NB], odd[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) even[r][b] = odd[r][b] = _mm256_setzero_ps();
  const std::int64_t block_floats = hd * 8;
  for (std::int64_t i = 0; i < hd; i += 2) {
    __m256 qe[R], qo[R];
    for (int r = 0; r < R; ++r) {
      qe[r] = _mm256_broadcast_ss(q[r] + i);
      qo[r] = _mm256_broadcast_ss(q[r] + i + 1);
    }
    for (int b = 0; b < NB; ++b) {
      const __m256 k0 = _mm256_loadu_ps(kblock + b * block_floats + i * 8);
      const __m256 k1 = _mm256_loadu_ps(kblock + b * block_floats + i * 8 + 8);
      for (int r = 0; r < R; ++r) {
        even[r][b] = _mm256_fmadd_ps(qe[r], k0, even[r][b]);
        odd[r][b] = _mm256_fmadd_ps(qo[r], k1, odd[r][b]);
      }
    }
  }
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) _mm256_storeu_ps(s[r] + b * 8, _mm256_mul_ps(_mm256_add_ps(even[r][b], odd[r][b]), vscale));
}

// Scores of R queries against keys [0, n_blocks * 8): NB blocks at a time where the queries are few (enough
// independent chains), then one block at a time.
template <int R>
void scores_of(const float* const* q, const float* keys, std::int64_t hd, float scale, std::int64_t n_blocks,
               float* scores, std::int64_t score_stride) {
  constexpr int NB = R == 1 ? 4 : R == 2 ? 2 : 1;
  float* s[R];
  for (int r = 0; r < R; ++r) s[r] = scores + r * score_stride;
  std::int64_t b = 0;
  for (; b + NB <= n_blocks; b += NB) {
    float* sb[R];
    for (int r = 0; r < R; ++r) sb[r] = s[r] + b * 8;
    score_blocks<R, NB>(q, keys + b * hd * 8, hd, scale, sb);
  }
  for (; b < n_blocks; ++b) {
    float* sb[R];
    for (int r = 0; r < R; ++r) sb[r] = s[r] + b * 8;
    score_blocks<R, 1>(q, keys + b * hd * 8, hd, scale, sb);
  }
}

inline float horizontal_sum(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// Softmax of one row of scores s[0 .. n) in place (s has room up to n rounded up to 8).
void softmax(float* s, int n) {
  float max_score = -INFINITY;
  for (int j = 0; j < n; ++j) max_score = std::max(max_score, s[j]);
  const __m256 vmax = _mm256_set1_ps(max_score);
  __m256 vtotal = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = osengine::detail::avx2::exp_approx(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmax));
    _mm256_storeu_ps(s + j, e);
    vtotal = _mm256_add_ps(vtotal, e);
  }
  float total = horizontal_sum(vtotal);
  if (j < n) {  // the last partial block: lanes past n hold scores of keys this row does not see
    alignas(32) float e[8];
    _mm256_store_ps(e, osengine::detail::avx2::exp_approx(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmax)));
    for (int t = 0; j + t < n; ++t) {
      s[j + t] = e[t];
      total += e[t];
    }
  }
  const __m256 vt = _mm256_set1_ps(total);
  for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, _mm256_div_ps(_mm256_loadu_ps(s + j), vt));
  for (; j < n; ++j) s[j] /= total;
}

// out[r][c0 .. c0 + 8W) += sum over j in [j0, j1) of p[r][j] V_j, one fma per key in key order (the same chain for
// any R), reading each value vector once for the R rows.
template <int R, int W>
void accumulate_values(const float* const* p, const float* values, std::int64_t hd, std::int64_t c0, int j0, int j1,
                       float* const* out) {
  __m256 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = _mm256_loadu_ps(out[r] + c0 + 8 * w);
  for (int j = j0; j < j1; ++j) {
    const float* v = values + j * hd + c0;
    __m256 pj[R];
    for (int r = 0; r < R; ++r) pj[r] = _mm256_broadcast_ss(p[r] + j);
    for (int w = 0; w < W; ++w) {
      const __m256 x = _mm256_loadu_ps(v + 8 * w);
      for (int r = 0; r < R; ++r) acc[r][w] = _mm256_fmadd_ps(pj[r], x, acc[r][w]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) _mm256_storeu_ps(out[r] + c0 + 8 * w, acc[r][w]);
}

template <int R>
void values_of(const float* const* p, const float* values, std::int64_t hd, int j0, int j1, float* const* out) {
  std::int64_t c = 0;
  for (; c + 16 <= hd; c += 16) accumulate_values<R, 2>(p, values, hd, c, j0, j1, out);
  for (; c < hd; c += 8) accumulate_values<R, 1>(p, values, hd, c, j0, j1, out);
}

template <int R>
void attend_rows(const float* const* q, const int* n_keys, const float* keys, const float* values, std::int64_t hd,
                 float scale, float* scores, std::int64_t score_stride, float* const* out) {
  int most = 0, fewest = n_keys[0];
  for (int r = 0; r < R; ++r) {
    most = std::max(most, n_keys[r]);
    fewest = std::min(fewest, n_keys[r]);
  }
  scores_of<R>(q, keys, hd, scale, (most + 7) / 8, scores, score_stride);
  const float* p[R];
  for (int r = 0; r < R; ++r) {
    softmax(scores + r * score_stride, n_keys[r]);
    p[r] = scores + r * score_stride;
    std::fill(out[r], out[r] + hd, 0.0f);
  }
  // the keys every row sees together, then each row's own last keys (its chain goes on in key order)
  values_of<R>(p, values, hd, 0, fewest, out);
  for (int r = 0; r < R; ++r)
    if (n_keys[r] > fewest) values_of<1>(p + r, values, hd, fewest, n_keys[r], out + r);
}

}  // namespace

void attend_avx2(const float* const* q, const int* n_keys, int rows, const float* keys, const float* values,
                 std::int64_t hd, float scale, float* scores, std::int64_t score_stride, float* const* out) {
  if (hd % 8 != 0) {
    attend_scalar(q, n_keys, rows, keys, values, hd, scale, scores, score_stride, out);
    return;
  }
  switch (rows) {
    case 1: return attend_rows<1>(q, n_keys, keys, values, hd, scale, scores, score_stride, out);
    case 2: return attend_rows<2>(q, n_keys, keys, values, hd, scale, scores, score_stride, out);
    case 3: return attend_rows<3>(q, n_keys, keys, values, hd, scale, scores, score_stride, out);
    default: return attend_rows<4>(q, n_keys, keys, values, hd, scale, scores, score_stride, out);
  }
}

}  // namespace osengine::runtime::detail
