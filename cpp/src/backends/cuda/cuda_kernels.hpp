// The CUDA backend's kernel contract: plain host functions (no CUDA types) implemented in the .cu files and called by
// dispatch.cpp. Every pointer is device memory; every launch goes onto `stream` and nothing synchronizes.
// Launchers return a cudaError_t value as int (0 = success) so that this header needs no CUDA include.
#pragma once
#include <cstdint>

#include "backends/kernels.hpp"

namespace osengine::detail::cuda {

using Stream = void*;  // cudaStream_t

// ---- activation quantization (quantize.cu) ---------------------------------
// Same problem as the CPU kernels (pointers on the device); x may be float32, bfloat16 or float16.
// Non-finite values are not reported (that would need a synchronization): their codes clamp into the range.
int quantize(const QuantizeProblem& problem, Stream stream);

// ---- GEMM pieces ------------------------------------------------------------
// The weights as the kernels see them (device pointers).
struct DeviceWeights {
  const void* data = nullptr;               // int8 [n, k] row-major, or int4 packed [n, k/2] (int4.hpp)
  const std::int32_t* column_sums = nullptr;  // [groups, n]
  int bits = 8;
  std::int64_t group_size = 0;  // 0 = one group spanning K
};

// Everything the epilogue reads, with device pointers (GemmProblem's epilogue fields).
struct Epilogue {
  const float* a_scale = nullptr;
  std::int64_t a_scale_stride_m = 0, a_scale_stride_g = 0;
  const std::int32_t* a_zero_point = nullptr;
  const float* w_scale = nullptr;
  std::int64_t w_scale_stride_n = 0, w_scale_stride_g = 0;
  const float* bias = nullptr;
  const void* residual = nullptr;
  DType residual_dtype = DType::float32;
  Activation activation = Activation::none;
  void* out = nullptr;
  DType out_dtype = DType::float32;
};

// Fallback GEMM on CUDA cores (gemm_simt.cu): any shape, any alignment, int8 / int4 activations and weights,
// groups; the whole epilogue fused. With `accumulators` set, writes sum_k A W^T as int32 [m, n] instead.
int gemm_simt(const std::int8_t* a, ActivationFormat a_format, std::int64_t m, std::int64_t n, std::int64_t k,
              const DeviceWeights& w, const Epilogue& e, std::int32_t* accumulators, Stream stream);

// Epilogue over int32 accumulators of one group g (epilogue.cu). acc: [m, n] = sum over group g.
// groups == 1: out = act(fma(acc - zp*colsum, a_s*w_s, bias)) + residual directly.
// groups > 1: y (float [m, n]) carries the running sum: g == 0 starts it from the bias, the last group finishes.
int epilogue(const std::int32_t* acc, std::int64_t m, std::int64_t n, std::int64_t group, std::int64_t groups,
             const std::int32_t* column_sums, const Epilogue& e, float* y, Stream stream);

// ---- tensor-core GEMMs: int32 accumulators of A[m, k] (lda) x W[n, k]^T (ldb) into acc[m, n] (ldc = n) ----
// Return -1 when the shape / alignment is not supported by the kernel (the caller falls back), else a cudaError_t.
// Operand pointers must be 16-byte aligned and lda, ldb multiples of 16 (int8) / 32 (int4) elements.
int gemm_sm80_s8(const std::int8_t* a, std::int64_t lda, const std::int8_t* w, std::int64_t ldb, std::int32_t* acc,
                 std::int64_t m, std::int64_t n, std::int64_t k, Stream stream);
int gemm_sm80_s4(const void* a, std::int64_t lda, const void* w, std::int64_t ldb, std::int32_t* acc, std::int64_t m,
                 std::int64_t n, std::int64_t k, Stream stream);
// W4A8: int8 A x int4 W (ldb in int4 elements), the weights upcast to int8 in registers.
int gemm_sm80_s8s4(const std::int8_t* a, std::int64_t lda, const void* w, std::int64_t ldb, std::int32_t* acc,
                   std::int64_t m, std::int64_t n, std::int64_t k, Stream stream);
int gemm_sm90_s8(const std::int8_t* a, std::int64_t lda, const std::int8_t* w, std::int64_t ldb, std::int32_t* acc,
                 std::int64_t m, std::int64_t n, std::int64_t k, Stream stream);

}  // namespace osengine::detail::cuda
