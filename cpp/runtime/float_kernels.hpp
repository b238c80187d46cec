// The runtime's floating-point kernels (lm_head, attention, float linears): fp32 dot products and a*x+y, with an
// AVX2 + FMA version chosen at run time. Each result is computed by one thread in a fixed order, so results do not
// depend on the thread count (they may differ between the AVX2 and the scalar version in the last bits).
#pragma once
#include <cstdint>

namespace osengine::runtime::detail {

struct FloatKernels {
  float (*dot)(const float* a, const float* b, std::int64_t n);
  void (*axpy)(float alpha, const float* x, float* y, std::int64_t n);  // y += alpha * x
};

// The kernels for this CPU (AVX2 where the CPU and the build have it).
const FloatKernels& float_kernels();

float dot_scalar(const float* a, const float* b, std::int64_t n);
void axpy_scalar(float alpha, const float* x, float* y, std::int64_t n);
#if defined(OSENGINE_RUNTIME_AVX2)
float dot_avx2(const float* a, const float* b, std::int64_t n);
void axpy_avx2(float alpha, const float* x, float* y, std::int64_t n);
#endif

}  // namespace osengine::runtime::detail
