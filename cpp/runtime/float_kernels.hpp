// The runtime's floating-point kernels (lm_head, attention, float linears): fp32 dot products and a*x+y, with an
// AVX2 + FMA version chosen at run time. Each result is computed by one thread in a fixed order, so results do not
// depend on the thread count (they may differ between the AVX2 and the scalar version in the last bits).
#pragma once
#include <cstdint>

namespace osengine::runtime::detail {

struct FloatKernels {
  float (*dot)(const float* a, const float* b, std::int64_t n);
  void (*axpy)(float alpha, const float* x, float* y, std::int64_t n);  // y += alpha * x
  // One query's attention: out[hd] = sum_j p_j V_j with p = softmax(scale * (q . K_j)) over j < n_keys (K_j, V_j:
  // rows of hd floats, consecutive); scores: n_keys floats of scratch.
  void (*attend)(const float* q, const float* keys, const float* values, int n_keys, std::int64_t hd, float scale,
                 float* scores, float* out);
};

// The kernels for this CPU (AVX2 where the CPU and the build have it).
const FloatKernels& float_kernels();

float dot_scalar(const float* a, const float* b, std::int64_t n);
void axpy_scalar(float alpha, const float* x, float* y, std::int64_t n);
void attend_scalar(const float* q, const float* keys, const float* values, int n_keys, std::int64_t hd, float scale,
                   float* scores, float* out);
#if defined(OSENGINE_RUNTIME_AVX2)
float dot_avx2(const float* a, const float* b, std::int64_t n);
void axpy_avx2(float alpha, const float* x, float* y, std::int64_t n);
void attend_avx2(const float* q, const float* keys, const float* values, int n_keys, std::int64_t hd, float scale,
                 float* scores, float* out);
#endif

}  // namespace osengine::runtime::detail
