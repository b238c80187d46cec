// AVX2 activation quantization: bit-identical to backends/reference/quantize.cpp.
//
// Per row: y = (x - shift) / smooth_scale is computed once into a per-thread row buffer (8 lanes at a time, the
// same two IEEE operations as the reference), checking finiteness on the way. Dynamic mode then reduces
// min/max per group (min/max are exact, so the reduction order does not matter; the sign of a zero cannot change
// delta or the zero point) and derives delta / zero point with the reference's scalar code. Codes are
// clamp(nearbyint(y / delta) + zp) with a true division and round-to-nearest-even, packed to int8 32 at a time.
// Rows are split over threads; the first non-finite row is the minimum over the threads' first bad rows (every
// thread scans its rows in order and stops at its first bad one).
// With rotate, the prologue goes to a second row buffer, the butterflies run there in place (8 lanes across
// contiguous columns: h = 1, 2, 4 inside a register, h = 8, 16 across the registers of a 32-value chunk, larger h
// two stages per pass), and the dense H_m stage reads it into the row buffer, three outputs by 32 columns in 12
// accumulators, the rotated sums finishing in registers (scale, shift, smooth scale, finiteness).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "core/threading.hpp"
#include "backends/avx2/avx2.hpp"
#include "backends/avx2/float_math_avx2.hpp"
#include "backends/kernels.hpp"
#include "core/hadamard.hpp"

namespace osengine::detail {

namespace {

// rms_norm_factor (kernels.hpp) with the 8 partial sums in one register: lane l of the fma chain is partial l.
float rms_norm_factor_avx2(const float* x, std::int64_t k, float eps) {
  __m256 acc = _mm256_setzero_ps();
  std::int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  alignas(32) float partial[8];
  _mm256_store_ps(partial, acc);
  for (; i < k; ++i) partial[i % 8] = std::fma(x[i], x[i], partial[i % 8]);
  const float sum = ((partial[0] + partial[4]) + (partial[2] + partial[6])) +
                    ((partial[1] + partial[5]) + (partial[3] + partial[7]));
  return 1.0f / std::sqrt(sum / static_cast<float>(k) + eps);
}

// y = (x - shift) / smooth_scale for one row, x first normalized when the problem has an RMSNorm; returns false when
// some y is not finite.
bool transform_row(const QuantizeProblem& p, std::int64_t row, float* y) {
  const std::int64_t k = p.k;
  const __m256i exp_mask = _mm256_set1_epi32(0x7f800000);
  __m256i bad = _mm256_setzero_si256();
  const float* xf = p.x_dtype == DType::float32 ? static_cast<const float*>(p.x) + row * p.x_row_elements() : nullptr;
  const std::uint16_t* xh =
      p.x_dtype == DType::bfloat16 ? static_cast<const std::uint16_t*>(p.x) + row * p.x_row_elements() : nullptr;
  if (p.silu_gate) {  // silu(gate) * up into y first, then work from there in place
    std::int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
      const __m256 g = xf ? _mm256_loadu_ps(xf + j) : avx2::load_bf16(xh + j);
      const __m256 u = xf ? _mm256_loadu_ps(xf + k + j) : avx2::load_bf16(xh + k + j);
      _mm256_storeu_ps(y + j, _mm256_mul_ps(avx2::silu_approx(g), u));
    }
    for (; j < k; ++j) {
      const float g = xf ? xf[j] : bf16_to_float(xh[j]), u = xf ? xf[k + j] : bf16_to_float(xh[k + j]);
      y[j] = silu_approx(g) * u;
    }
    xf = y;
    xh = nullptr;
  }
  float r = 1.0f;
  if (p.rms_norm_weight) {
    if (xh) {  // bf16: widen the row into y first, then work from there in place
      for (std::int64_t j = 0; j < k; ++j) y[j] = bf16_to_float(xh[j]);
      xf = y;
      xh = nullptr;
    }
    r = rms_norm_factor_avx2(xf, k, p.rms_norm_eps);
    if (!std::isfinite(r) || r == 0.0f) return false;  // non-finite x, or the sum of squares overflowed
  }
  const __m256 vr = _mm256_set1_ps(r);
  std::int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 v = xf ? _mm256_loadu_ps(xf + i) : avx2::load_bf16(xh + i);
    if (p.rms_norm_weight) v = _mm256_mul_ps(_mm256_loadu_ps(p.rms_norm_weight + i), _mm256_mul_ps(v, vr));
    if (p.shift) v = _mm256_sub_ps(v, _mm256_loadu_ps(p.shift + i));
    if (p.smooth_scale) v = _mm256_div_ps(v, _mm256_loadu_ps(p.smooth_scale + i));
    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), exp_mask), exp_mask));
    _mm256_storeu_ps(y + i, v);
  }
  bool finite = _mm256_testz_si256(bad, bad) != 0;
  for (; i < k; ++i) {
    float v = xf ? xf[i] : bf16_to_float(xh[i]);
    if (p.rms_norm_weight) v = p.rms_norm_weight[i] * (v * r);
    if (p.shift) v = v - p.shift[i];
    if (p.smooth_scale) v = v / p.smooth_scale[i];
    if (!std::isfinite(v)) finite = false;
    y[i] = v;
  }
  return finite;
}

// ---- the online Hadamard rotation (QuantizeProblem::rotate), 8 lanes at a time --------------------------------
// Bit-identical to core/hadamard.cpp's hadamard_transform_row: the same additions and subtractions on the same
// pairs, the dense stage's terms in the same order (as fma(x, +-1, acc), which is acc +- x rounded once), the same
// final product; lanes only change which independent elements are computed together.

// Butterflies h = 1, 2, 4 on 8 consecutive values of a block (their pairs never leave the vector). Each stage is
// fma(partner, +-1, first): lanes holding x_j get x_j + x_{j+h}, lanes holding x_{j+h} get x_j - x_{j+h}, each one
// rounding of an exact sum, so the same bits as the scalar additions and subtractions.
inline __m256 butterflies_within(__m256 v) {
  const __m256 alt1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 alt2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 alt4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  v = _mm256_fmadd_ps(_mm256_movehdup_ps(v), alt1, _mm256_moveldup_ps(v));                    // h = 1
  v = _mm256_fmadd_ps(_mm256_permute_ps(v, 0xEE), alt2, _mm256_permute_ps(v, 0x44));          // h = 2
  return _mm256_fmadd_ps(_mm256_permute2f128_ps(v, v, 0x11), alt4, _mm256_permute2f128_ps(v, v, 0x00));  // h = 4
}

// One butterfly stage across two vectors: (a, b) -> (a + b, a - b).
inline void butterfly(__m256& a, __m256& b) {
  const __m256 sum = _mm256_add_ps(a, b);
  b = _mm256_sub_ps(a, b);
  a = sum;
}

// Stages h = 1 .. C/2 on C (8, 16 or 32) consecutive values of a block held in v[C / 8].
template <int C>
inline void butterflies_chunk(__m256* v) {
  for (int i = 0; i < C / 8; ++i) v[i] = butterflies_within(v[i]);
  if constexpr (C >= 16) butterfly(v[0], v[1]);  // h = 8
  if constexpr (C == 32) {
    butterfly(v[2], v[3]);
    butterfly(v[0], v[2]);  // h = 16
    butterfly(v[1], v[3]);
  }
}

// The prologue's output (t holding silu(gate) * up, w * (t * r) with t = x widened, or x itself), C values at a time,
// through the butterflies h < C in registers, into t. C is a template argument so that the chunk stays in registers.
// While it computes, it prefetches the next row of x (`next`, `next_bytes`; null on a thread's last row), a few cache
// lines per chunk: the rotation is compute-bound, and without this the next row's loads would wait for memory
// after it instead of overlapping it.
template <int C>
void prologue_butterflies(const QuantizeProblem& p, const float* xf, const std::uint16_t* xh, float r, float* t,
                          const char* next, std::int64_t next_bytes) {
  const __m256 vr = _mm256_set1_ps(r);
  const std::int64_t lines = next ? (next_bytes + 63) / 64 : 0, chunks = p.k / C;
  const std::int64_t lines_per_chunk = (lines + chunks - 1) / chunks;
  std::int64_t line = 0;
  for (std::int64_t j = 0; j < p.k; j += C) {
    for (std::int64_t i = 0; i < lines_per_chunk && line < lines; ++i, ++line)
      _mm_prefetch(next + line * 64, _MM_HINT_T0);
    __m256 v[C / 8];
    for (int i = 0; i < C / 8; ++i) {
      const std::int64_t c = j + 8 * i;
      if (p.rms_norm_weight)
        v[i] = _mm256_mul_ps(_mm256_loadu_ps(p.rms_norm_weight + c), _mm256_mul_ps(_mm256_loadu_ps(t + c), vr));
      else if (p.silu_gate)
        v[i] = _mm256_loadu_ps(t + c);
      else
        v[i] = xf ? _mm256_loadu_ps(xf + c) : avx2::load_bf16(xh + c);
    }
    butterflies_chunk<C>(v);
    for (int i = 0; i < C / 8; ++i) _mm256_storeu_ps(t + j + 8 * i, v[i]);
  }
}

// The stages h = h0, 2 h0, ..., p/2 of one block v[p] (h0 >= 8 a power of two), two per pass (h and 2h on 4
// vectors at j, j + h, j + 2h, j + 3h), the last one alone when their number is odd.
void butterflies_across(float* v, std::int64_t p, std::int64_t h0) {
  std::int64_t h = h0;
  for (; 4 * h <= p; h *= 4)
    for (std::int64_t s = 0; s < p; s += 4 * h)
      for (std::int64_t j = s; j < s + h; j += 8) {
        __m256 a0 = _mm256_loadu_ps(v + j), a1 = _mm256_loadu_ps(v + j + h);
        __m256 a2 = _mm256_loadu_ps(v + j + 2 * h), a3 = _mm256_loadu_ps(v + j + 3 * h);
        butterfly(a0, a1);  // stage h: (j, j+h), (j+2h, j+3h)
        butterfly(a2, a3);
        butterfly(a0, a2);  // stage 2h: (j, j+2h), (j+h, j+3h)
        butterfly(a1, a3);
        _mm256_storeu_ps(v + j, a0);
        _mm256_storeu_ps(v + j + h, a1);
        _mm256_storeu_ps(v + j + 2 * h, a2);
        _mm256_storeu_ps(v + j + 3 * h, a3);
      }
  if (h < p)  // the last stage alone (h = p / 2)
    for (std::int64_t j = 0; j < h; j += 8) {
      __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + h);
      butterfly(a, b);
      _mm256_storeu_ps(v + j, a);
      _mm256_storeu_ps(v + j + h, b);
    }
}

// What follows the rotation, applied to 8 rotated sums: times 1 / sqrt(k), then the shift and the smooth scale;
// non-finite results are collected in `bad` (a register of the caller's loop).
struct RotationEpilogue {
  const float* shift;
  const float* smooth_scale;
  __m256 scale;

  inline void store(__m256 acc, float* y, std::int64_t i, __m256i& bad) const {
    __m256 v = _mm256_mul_ps(acc, scale);
    if (shift) v = _mm256_sub_ps(v, _mm256_loadu_ps(shift + i));
    if (smooth_scale) v = _mm256_div_ps(v, _mm256_loadu_ps(smooth_scale + i));
    const __m256i exp_mask = _mm256_set1_epi32(0x7f800000);
    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), exp_mask), exp_mask));
    _mm256_storeu_ps(y + i, v);
  }
};

// The dense stage for R outputs c .. c + R - 1 (R = 1, 2 or 3) and columns [b0, b0 + 8B) of every block (B = 1, 2 or
// 4): y[c', b] = sum_a H[a][c'] t[a, b], a in order, in R * B accumulators, then the epilogue. Up to 12 independent
// fma chains hide the fma latency; each loaded x serves the R outputs. (The loops over the fixed extents are fully
// unrolled, so that GCC keeps the arrays in registers.)
template <int R, int B>
inline void dense_block(const HadamardPlan& plan, const float* t, std::int64_t b0, std::int64_t c, float* y,
                        const RotationEpilogue& epi, __m256i& bad) {
  const std::int64_t m = plan.m, p = plan.p;
  const float* signs = plan.column_signs + c * m;  // output c + r: signs[r * m + a]
  const float* t0 = t + b0;
  __m256 acc[R][B];
#pragma GCC unroll 4
  for (int j = 0; j < B; ++j) {
    const __m256 x = _mm256_loadu_ps(t0 + 8 * j);
#pragma GCC unroll 3
    for (int r = 0; r < R; ++r) acc[r][j] = _mm256_mul_ps(x, _mm256_broadcast_ss(signs + r * m));  // +-x, exact
  }
  for (std::int64_t a = 1; a < m; ++a) {
    __m256 g[R];
#pragma GCC unroll 3
    for (int r = 0; r < R; ++r) g[r] = _mm256_broadcast_ss(signs + r * m + a);
    const float* ta = t0 + a * p;
#pragma GCC unroll 4
    for (int j = 0; j < B; ++j) {
      const __m256 x = _mm256_loadu_ps(ta + 8 * j);
#pragma GCC unroll 3
      for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(x, g[r], acc[r][j]);  // acc +- x
    }
  }
#pragma GCC unroll 3
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < B; ++j) epi.store(acc[r][j], y, (c + r) * p + b0 + 8 * j, bad);
}

// All outputs of the dense stage for columns [b0, b0 + 8B): three at a time, then the one or two left.
template <int B>
inline void dense_columns(const HadamardPlan& plan, const float* t, std::int64_t b0, float* y,
                          const RotationEpilogue& epi, __m256i& bad) {
  std::int64_t c = 0;
  for (; c + 3 <= plan.m; c += 3) dense_block<3, B>(plan, t, b0, c, y, epi, bad);
  if (plan.m - c == 2) dense_block<2, B>(plan, t, b0, c, y, epi, bad);
  if (plan.m - c == 1) dense_block<1, B>(plan, t, b0, c, y, epi, bad);
}

// The prologue of one row (x itself, silu(gate) * up, or the RMSNorm w * (x * r)), rotated: y = ((x H / sqrt(k)) -
// shift) / smooth_scale, t a scratch row. Returns false when some value is not finite.
bool transform_row_rotated(const QuantizeProblem& p, std::int64_t row, float* y, float* t, bool prefetch_next) {
  const HadamardPlan& plan = p.hadamard;
  const std::int64_t m = plan.m, pb = plan.p, k = p.k;
  const float* xf = p.x_dtype == DType::float32 ? static_cast<const float*>(p.x) + row * p.x_row_elements() : nullptr;
  const std::uint16_t* xh =
      p.x_dtype == DType::bfloat16 ? static_cast<const std::uint16_t*>(p.x) + row * p.x_row_elements() : nullptr;
  // 0. what needs the whole row first: silu(gate) * up into t (its own pass: fused with the butterflies, silu's
  // registers spill and the row takes longer), or x widened into t and the norm factor r
  float r = 1.0f;
  if (p.silu_gate) {
    std::int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
      const __m256 g = xf ? _mm256_loadu_ps(xf + j) : avx2::load_bf16(xh + j);
      const __m256 u = xf ? _mm256_loadu_ps(xf + k + j) : avx2::load_bf16(xh + k + j);
      _mm256_storeu_ps(t + j, _mm256_mul_ps(avx2::silu_approx(g), u));
    }
    for (; j < k; ++j)
      t[j] = silu_approx(xf ? xf[j] : bf16_to_float(xh[j])) * (xf ? xf[k + j] : bf16_to_float(xh[k + j]));
  } else if (p.rms_norm_weight) {
    for (std::int64_t j = 0; j < k; ++j) t[j] = xf ? xf[j] : bf16_to_float(xh[j]);
    r = rms_norm_factor_avx2(t, k, p.rms_norm_eps);
    if (!std::isfinite(r) || r == 0.0f) return false;  // non-finite x, or the sum of squares overflowed
  }
  if (pb < 8) {  // blocks shorter than a vector: the scalar prologue and transform, then the shift and scale
    for (std::int64_t j = 0; j < k; ++j)
      if (p.rms_norm_weight)
        t[j] = p.rms_norm_weight[j] * (t[j] * r);
      else if (!p.silu_gate)
        t[j] = xf ? xf[j] : bf16_to_float(xh[j]);
    hadamard_transform_row(plan, t, y);
    bool finite = true;
    for (std::int64_t i = 0; i < k; ++i) {
      float v = y[i];
      if (p.shift) v = v - p.shift[i];
      if (p.smooth_scale) v = v / p.smooth_scale[i];
      if (!std::isfinite(v)) finite = false;
      y[i] = v;
    }
    return finite;
  }
  // 1. the butterflies h < chunk on each chunk in registers (with the norm's product or the load of x), into t
  const std::int64_t row_bytes = p.x_row_elements() * (p.x_dtype == DType::bfloat16 ? 2 : 4);
  const char* next = prefetch_next ? static_cast<const char*>(p.x) + (row + 1) * row_bytes : nullptr;
  const std::int64_t chunk = std::min<std::int64_t>(32, pb);
  if (chunk == 32)
    prologue_butterflies<32>(p, xf, xh, r, t, next, row_bytes);
  else if (chunk == 16)
    prologue_butterflies<16>(p, xf, xh, r, t, next, row_bytes);
  else
    prologue_butterflies<8>(p, xf, xh, r, t, next, row_bytes);
  // 2. the remaining butterflies, per block
  if (pb > chunk)
    for (std::int64_t a = 0; a < m; ++a) butterflies_across(t + a * pb, pb, chunk);
  // 3. the dense stage (none for m = 1), then the scale, shift and smooth scale, into y
  const RotationEpilogue epi{p.shift, p.smooth_scale, _mm256_set1_ps(plan.scale)};
  __m256i bad = _mm256_setzero_si256();
  if (m == 1) {
    for (std::int64_t i = 0; i < k; i += 8) epi.store(_mm256_loadu_ps(t + i), y, i, bad);
  } else {
    std::int64_t b0 = 0;
    for (; b0 + 32 <= pb; b0 += 32) dense_columns<4>(plan, t, b0, y, epi, bad);
    for (; b0 + 16 <= pb; b0 += 16) dense_columns<2>(plan, t, b0, y, epi, bad);
    for (; b0 < pb; b0 += 8) dense_columns<1>(plan, t, b0, y, epi, bad);
  }
  return _mm256_testz_si256(bad, bad) != 0;
}

inline std::int8_t quantize_scalar(float y, float delta, std::int32_t zero_point, int qmin, int qmax) {
  float v = std::nearbyint(y / delta) + static_cast<float>(zero_point);
  v = std::fmin(std::fmax(v, static_cast<float>(qmin)), static_cast<float>(qmax));
  return static_cast<std::int8_t>(v);
}

inline __m256i quantize8(const float* y, __m256 delta, __m256 zp, __m256 qmin, __m256 qmax) {
  __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(y), delta), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_add_ps(v, zp);
  v = _mm256_min_ps(_mm256_max_ps(v, qmin), qmax);
  return _mm256_cvtps_epi32(v);
}

void quantize_group(const float* y, std::int64_t count, float delta, std::int32_t zero_point, int qmin, int qmax,
                    std::int8_t* out) {
  const __m256 vd = _mm256_set1_ps(delta), vz = _mm256_set1_ps(static_cast<float>(zero_point));
  const __m256 vlo = _mm256_set1_ps(static_cast<float>(qmin)), vhi = _mm256_set1_ps(static_cast<float>(qmax));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  std::int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    const __m256i a = quantize8(y + i, vd, vz, vlo, vhi), b = quantize8(y + i + 8, vd, vz, vlo, vhi);
    const __m256i c = quantize8(y + i + 16, vd, vz, vlo, vhi), d = quantize8(y + i + 24, vd, vz, vlo, vhi);
    // packs work per 128-bit lane: ab = [a0 b0 | a1 b1], cd = [c0 d0 | c1 d1] (4 values each),
    // abcd = [a0 b0 c0 d0 | a1 b1 c1 d1]; restore the order with a dword permutation.
    const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
    const __m256i abcd = _mm256_packs_epi16(ab, cd);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(abcd, order));
  }
  for (; i < count; ++i) out[i] = quantize_scalar(y[i], delta, zero_point, qmin, qmax);
}

void min_max(const float* y, std::int64_t count, float& lo_out, float& hi_out) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  std::int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 v = _mm256_loadu_ps(y + i);
    lo = _mm256_min_ps(lo, v);
    hi = _mm256_max_ps(hi, v);
  }
  alignas(32) float l[8], h[8];
  _mm256_store_ps(l, lo);
  _mm256_store_ps(h, hi);
  float lo_s = 0.0f, hi_s = 0.0f;
  for (int j = 0; j < 8; ++j) {
    lo_s = std::fmin(lo_s, l[j]);
    hi_s = std::fmax(hi_s, h[j]);
  }
  for (; i < count; ++i) {
    lo_s = std::fmin(lo_s, y[i]);
    hi_s = std::fmax(hi_s, y[i]);
  }
  lo_out = lo_s;
  hi_out = hi_s;
}

}  // namespace

std::int64_t quantize_avx2(const QuantizeProblem& p) {
  const std::int64_t groups = p.k / p.group_size;
  std::atomic<std::int64_t> first_bad{p.m};
  const std::int64_t min_rows = std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(1, p.k));
  parallel_for(p.m, min_rows, [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> y(static_cast<std::size_t>(p.k));
    std::vector<float> t(p.rotate ? static_cast<std::size_t>(p.k) : 0);  // the rotation's input
    for (std::int64_t row = begin; row < end; ++row) {
      const bool finite =
          p.rotate ? transform_row_rotated(p, row, y.data(), t.data(), row + 1 < end) : transform_row(p, row, y.data());
      if (!finite) {
        std::int64_t seen = first_bad.load();
        while (row < seen && !first_bad.compare_exchange_weak(seen, row)) {
        }
        return;
      }
      for (std::int64_t g = 0; g < groups; ++g) {
        const float* yg = y.data() + g * p.group_size;
        float delta;
        std::int32_t zero_point = 0;
        if (p.dynamic) {
          float lo, hi;
          min_max(yg, p.group_size, lo, hi);
          if (p.symmetric) {
            delta = std::fmax(-lo, hi) / static_cast<float>(p.qmax);
          } else {
            delta = (hi - lo) / static_cast<float>(p.qmax - p.qmin);
          }
          if (!(delta > 0.0f)) delta = 1.0f;
          if (!p.symmetric) {
            float zp = static_cast<float>(p.qmin) - std::nearbyint(lo / delta);
            zp = std::fmin(std::fmax(zp, static_cast<float>(p.qmin)), static_cast<float>(p.qmax));
            zero_point = static_cast<std::int32_t>(zp);
          }
          p.out_delta[row * groups + g] = delta;
          p.out_zero_point[row * groups + g] = zero_point;
        } else {
          delta = p.delta[g * p.param_stride];
          zero_point = p.zero_point ? p.zero_point[g * p.param_stride] : 0;
        }
        quantize_group(yg, p.group_size, delta, zero_point, p.qmin, p.qmax, p.codes + row * p.k + g * p.group_size);
      }
    }
  });
  const std::int64_t bad = first_bad.load();
  return bad < p.m ? bad : -1;
}

}  // namespace osengine::detail
