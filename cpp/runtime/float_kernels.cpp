#include "float_kernels.hpp"

#include <algorithm>
#include <cmath>

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

void attend_scalar(const float* q, const float* keys, const float* values, int n_keys, std::int64_t hd, float scale,
                   float* scores, float* out) {
  float max_score = -INFINITY;
  for (int j = 0; j < n_keys; ++j) {
    scores[j] = dot_scalar(q, keys + j * hd, hd) * scale;
    max_score = std::max(max_score, scores[j]);
  }
  float total = 0.0f;
  for (int j = 0; j < n_keys; ++j) {
    scores[j] = std::exp(scores[j] - max_score);
    total += scores[j];
  }
  std::fill(out, out + hd, 0.0f);
  for (int j = 0; j < n_keys; ++j) axpy_scalar(scores[j] / total, values + j * hd, out, hd);
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
