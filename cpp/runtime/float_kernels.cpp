#include "float_kernels.hpp"

#include <algorithm>
#include <cmath>

#include "core/float_math.hpp"
#include "osengine/backend.hpp"

namespace osengine::runtime::detail {

float dot_scalar(const float* a, const float* b, std::int64_t n) {
  float acc = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

void axpy_scalar(float alpha, const float* x, float* y, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void attend_scalar(const float* const* q, const int* n_keys, int rows, const float* keys, const float* values,
                   std::int64_t hd, float scale, float* scores, std::int64_t score_stride, float* const* out) {
  for (int r = 0; r < rows; ++r) {
    float* s = scores + r * score_stride;
    const int n = n_keys[r];
    float max_score = -INFINITY;
    for (int j = 0; j < n; ++j) {
      float acc = 0.0f;
      for (std::int64_t i = 0; i < hd; ++i) acc += q[r][i] * keys[key_offset(j, i, hd)];
      s[j] = acc * scale;
      max_score = std::max(max_score, s[j]);
    }
    float total = 0.0f;
    for (int j = 0; j < n; ++j) {
      s[j] = osengine::detail::exp_approx(s[j] - max_score);
      total += s[j];
    }
    std::fill(out[r], out[r] + hd, 0.0f);
    for (int j = 0; j < n; ++j) axpy_scalar(s[j] / total, values + j * hd, out[r], hd);
  }
}

const FloatKernels& float_kernels() {
  static const FloatKernels kernels = [] {
#if defined(OSENGINE_RUNTIME_AVX2)
    if (cpu_has_avx2()) return FloatKernels{dot_avx2, axpy_avx2, attend_avx2};
#endif
    return FloatKernels{dot_scalar, axpy_scalar, attend_scalar};
  }();
  return kernels;
}

}  // namespace osengine::runtime::detail
