#include "float_kernels.hpp"

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

const FloatKernels& float_kernels() {
  static const FloatKernels kernels = [] {
#if defined(OSENGINE_RUNTIME_AVX2)
    if (cpu_has_avx2()) return FloatKernels{dot_avx2, axpy_avx2};
#endif
    return FloatKernels{dot_scalar, axpy_scalar};
  }();
  return kernels;
}

}  // namespace osengine::runtime::detail
