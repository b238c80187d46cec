// The contract between the ops (validation, dispatch) and the backends' kernels. Kernels receive validated,
// contiguous raw buffers and never throw for data-dependent reasons; they report what they found instead.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "osengine/gemm.hpp"
#include "osengine/packed_weights.hpp"
#include "osengine/tensor.hpp"

namespace osengine::detail {

struct QuantizeProblem {
  const void* x = nullptr;     // [m, k] float32 or bfloat16 (x_dtype); [m, 2k] = [gate | up] with silu_gate
  DType x_dtype = DType::float32;
  std::int64_t m = 0, k = 0;
  std::int64_t x_stride = 0;   // elements per row of x: 2k with silu_gate; 0 means k
  bool silu_gate = false;
  const float* shift = nullptr;         // [k] or null
  const float* smooth_scale = nullptr;  // [k] or null
  const float* rms_norm_weight = nullptr;  // [k] or null: x is normalized first (see quantize.hpp)
  float rms_norm_eps = 0.0f;
  std::int64_t group_size = 0;          // > 0, divides k (k itself when the op was given 0)
  int qmin = 0, qmax = 0;
  bool symmetric = true;
  bool dynamic = false;
  // static: one value per group (param_stride 1) or one value for all groups (param_stride 0)
  const float* delta = nullptr;
  const std::int32_t* zero_point = nullptr;  // null = 0
  std::int64_t param_stride = 0;
  // dynamic outputs: [m, k / group_size]
  float* out_delta = nullptr;
  std::int32_t* out_zero_point = nullptr;
  std::int8_t* codes = nullptr;  // [m, k]

  std::int64_t x_row_elements() const { return x_stride > 0 ? x_stride : k; }
};

// The RMSNorm factor r = 1 / sqrt(sum(x^2) / k + eps) of one row x[k] (fp32, the summation order of quantize.hpp);
// not finite when the sum of squares overflows.
float rms_norm_factor(const float* x, std::int64_t k, float eps);

// Returns the first row whose transformed values y = (x - shift) / smooth_scale hold a NaN or Inf, or -1.
// Rows after a non-finite one may or may not have been written.
std::int64_t quantize_reference(const QuantizeProblem& problem);
std::int64_t quantize_avx2(const QuantizeProblem& problem);

struct GemmProblem {
  const std::int8_t* a = nullptr;  // int8 [m, k], or int4 packed [m, k/2] for int4_packed
  ActivationFormat a_format = ActivationFormat::int8;
  std::int64_t m = 0, n = 0, k = 0;
  const PackedWeights* weights = nullptr;
  // Raw accumulator mode: when set, write sum_k A W^T as int32 [m, n] and ignore the epilogue below.
  std::int32_t* out_accumulators = nullptr;
  // Epilogue. Scales are addressed as base[row * stride_row + group * stride_group] (strides 0 broadcast).
  const float* a_scale = nullptr;
  std::int64_t a_scale_stride_m = 0, a_scale_stride_g = 0;
  const std::int32_t* a_zero_point = nullptr;  // null = 0; same strides as a_scale
  const float* w_scale = nullptr;
  std::int64_t w_scale_stride_n = 0, w_scale_stride_g = 0;
  const float* bias = nullptr;  // [n] or null
  const void* residual = nullptr;  // [m, n] or null
  DType residual_dtype = DType::float32;
  Activation activation = Activation::none;
  void* out = nullptr;  // [m, n]
  DType out_dtype = DType::float32;
};

void gemm_reference(const GemmProblem& problem);
void gemm_avx2(const GemmProblem& problem);

// Weight layouts. `codes` are int8 [n, k] (int4 values already sign-extended to int8).
struct WeightLayout {
  std::vector<std::uint8_t> data;
  std::int64_t padded_n = 0, padded_k = 0;
};
WeightLayout pack_weights_reference(const std::int8_t* codes, std::int64_t n, std::int64_t k, int bits);
// Unpack `count` rows (rows[i], or 0..count-1 when rows is null) into codes [count, k].
void unpack_weights_reference(const PackedWeights& weights, const std::int32_t* rows, std::int64_t count,
                              std::int8_t* codes);
WeightLayout pack_weights_avx2(const std::int8_t* codes, std::int64_t n, std::int64_t k, int bits,
                               std::int64_t group_size);
void unpack_weights_avx2(const PackedWeights& weights, const std::int32_t* rows, std::int64_t count,
                         std::int8_t* codes);

// Applies the epilogue's activation (scalar); shared by the backends for their scalar tails.
float apply_activation(Activation activation, float x);

// CUDA backend (cuda/dispatch.cpp; only in builds with OSENGINE_HAVE_CUDA). Problems hold device pointers; the work is
// queued on `stream` (a cudaStream_t as an integer, 0 = the default stream) and nothing synchronizes.
// CUDA runtime failures throw UnsupportedError. quantize_cuda does not detect non-finite inputs (always returns -1).
void gemm_cuda(const GemmProblem& problem, std::uintptr_t stream);
std::int64_t quantize_cuda(const QuantizeProblem& problem, int device_index, std::uintptr_t stream);
int cuda_current_device();
// Device memory for packed weights (load time, synchronous): an owning pointer that cudaFree's on release.
std::shared_ptr<void> cuda_upload(const void* host, std::size_t bytes, int device_index);
void cuda_download(const void* device, void* host, std::size_t bytes, int device_index);

}  // namespace osengine::detail
