// The runtime's floating-point kernels (lm_head, attention, float linears): fp32 dot products, a*x+y and attention,
// with an AVX2 + FMA version chosen at run time. Each result is computed by one thread in a fixed order, so results do not
// depend on the thread count (they may differ between the AVX2 and the scalar version in the last bits).
#pragma once
#include <cstdint>

namespace osengine::runtime::detail {

struct FloatKernels {
  float (*dot)(const float* a, const float* b, std::int64_t n);
  void (*axpy)(float alpha, const float* x, float* y, std::int64_t n);  // y += alpha * x
  // Causal attention of `rows` (1 .. kAttendRows) queries of one head over one sequence's cache: query r gives
  // out[r][hd] = sum_j p_j V_j with p = softmax(scale * (q[r] . K_j)) over j < n_keys[r]. keys: the key cache in
  // blocks of 8 positions, [block][hd][8] (key_offset); values: [position][hd]. scores: rows x score_stride floats
  // of scratch (score_stride >= n_keys rounded up to 8). Each query's result is the same whichever rows it is
  // computed with (prefill in one shot equals prefill in chunks, or token by token).
  void (*attend)(const float* const* q, const int* n_keys, int rows, const float* keys, const float* values,
                 std::int64_t hd, float scale, float* scores, std::int64_t score_stride, float* const* out);
};

// Queries per attend() call: they share each key and value load (prefill reads the cache once per group of rows).
constexpr int kAttendRows = 4;

// Index of K[pos][i] in the blocked key cache of attend().
inline std::int64_t key_offset(std::int64_t pos, std::int64_t i, std::int64_t hd) {
  return ((pos / 8) * hd + i) * 8 + pos % 8;
}

// The kernels for this CPU (AVX2 where the CPU and the build have it).
const FloatKernels& float_kernels();

float dot_scalar(const float* a, const float* b, std::int64_t n);
void axpy_scalar(float alpha, const float* x, float* y, std::int64_t n);
void attend_scalar(const float* const* q, const int* n_keys, int rows, const float* keys, const float* values,
                   std::int64_t hd, float scale, float* scores, std::int64_t score_stride, float* const* out);
#if defined(OSENGINE_RUNTIME_AVX2)
float dot_avx2(const float* a, const float* b, std::int64_t n);
void axpy_avx2(float alpha, const float* x, float* y, std::int64_t n);
void attend_avx2(const float* const* q, const int* n_keys, int rows, const float* keys, const float* values,
                 std::int64_t hd, float scale, float* scores, std::int64_t score_stride, float* const* out);
#endif

}  // namespace osengine::runtime::detail
