// AVX2 activation quantization: bit-identical to backends/reference/quantize.cpp.
//
// Per row: y = (x - shift) / smooth_scale is computed once into a per-thread row buffer (8 lanes at a time, the
// same two IEEE operations as the reference), checking finiteness on the way. Dynamic mode then reduces
// min/max per group (min/max are exact, so the reduction order does not matter; the sign of a zero cannot change
// delta or the zero point) and derives delta / zero point with the reference's scalar code. Codes are
// clamp(nearbyint(y / delta) + zp) with a true division and round-to-nearest-even, packed to int8 32 at a time.
// Rows are split over threads; the first non-finite row is the minimum over the threads' first bad rows (every
// thread scans its rows in order and stops at its first bad one).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "core/threading.hpp"
#include "backends/avx2/avx2.hpp"
#include "backends/avx2/float_math_avx2.hpp"
#include "backends/kernels.hpp"

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
    for (std::int64_t row = begin; row < end; ++row) {
      if (!transform_row(p, row, y.data())) {
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
