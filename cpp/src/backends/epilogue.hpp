// The GEMM epilogue in one host/device definition (see osengine/gemm.hpp for the formula): the bias, the per-token x
// per-channel (or per-group) scales, the zero-point correction acc - zp * colsum(W), the activation, the residual and
// the output conversion. Every backend computes each output element with these steps, in this order, so they agree
// bit for bit: the reference (backends/reference/gemm.cpp) and the CUDA kernels (cuda/epilogue.cu, cuda/gemm_simt.cu)
// call them element by element; the AVX2 kernels apply the same operations to 8 lanes at a time
// (backends/avx2/gemm_common.hpp) and call the loads below for their partial tiles.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "core/float_math.hpp"
#include "osengine/gemm.hpp"
#include "osengine/tensor.hpp"

namespace osengine::detail {

OSENGINE_HD float apply_activation(Activation activation, float x) {
  switch (activation) {
    case Activation::none: return x;
    case Activation::relu: return fmax_f(x, 0.0f);
    case Activation::gelu: return gelu_approx(x);
    case Activation::gelu_tanh: return gelu_tanh_approx(x);
    case Activation::silu: return silu_approx(x);
  }
  return x;
}

// One group's term, starting from y = bias (or 0) and taken for the groups in order:
//   y = fma(float(acc - zero_point * column_sum), a_scale * w_scale, y)      (the correction is exact int32)
OSENGINE_HD float epilogue_group(float y, std::int32_t acc, std::int32_t zero_point, std::int32_t column_sum,
                                 float a_scale, float w_scale) {
  const std::int32_t corrected = acc - zero_point * column_sum;
  return fma_rn(static_cast<float>(corrected), mul_rn(a_scale, w_scale), y);
}

// After the last group: the activation, then the residual (pass has_residual = false for none).
OSENGINE_HD float epilogue_finish(Activation activation, float y, bool has_residual, float residual) {
  y = apply_activation(activation, y);
  return has_residual ? add_rn(y, residual) : y;
}

// Loads and stores of the float formats the epilogue reads (residual) and writes (out): float32 and bfloat16 on every
// backend (bfloat16 rounded to nearest even, as float_to_bf16), float16 on the device only (the CPU ops refuse it).
OSENGINE_HD float load_float(const void* base, DType dtype, std::int64_t i) {
#if defined(__CUDA_ARCH__)
  switch (dtype) {
    case DType::bfloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case DType::float16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
#else
  if (dtype == DType::bfloat16) return bf16_to_float(static_cast<const std::uint16_t*>(base)[i]);
  return static_cast<const float*>(base)[i];
#endif
}

OSENGINE_HD void store_float(void* base, DType dtype, std::int64_t i, float v) {
#if defined(__CUDA_ARCH__)
  switch (dtype) {
    case DType::bfloat16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); break;
    case DType::float16: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(base)[i] = v; break;
  }
#else
  if (dtype == DType::bfloat16)
    static_cast<std::uint16_t*>(base)[i] = float_to_bf16(v);
  else
    static_cast<float*>(base)[i] = v;
#endif
}

// The same steps addressed through a problem's epilogue operands: `E` is GemmProblem on the host, cuda::Epilogue on
// the device (the same field names). Scales are read as base[row * stride_row + group * stride_group].
//   y = epilogue_start(e, col);
//   for each group g in order: y = epilogue_group_at(e, y, acc_g, column_sum_g, row, col, g);
//   epilogue_store(e, y, row * n + col);
template <class E>
OSENGINE_HD float epilogue_start(const E& e, std::int64_t col) {
  return e.bias ? e.bias[col] : 0.0f;
}

template <class E>
OSENGINE_HD float epilogue_group_at(const E& e, float y, std::int32_t acc, std::int32_t column_sum, std::int64_t row,
                                    std::int64_t col, std::int64_t g) {
  const std::int64_t a_index = row * e.a_scale_stride_m + g * e.a_scale_stride_g;
  return epilogue_group(y, acc, e.a_zero_point ? e.a_zero_point[a_index] : 0, column_sum, e.a_scale[a_index],
                        e.w_scale[col * e.w_scale_stride_n + g * e.w_scale_stride_g]);
}

// The activation, the residual at flat index i (when there is one) and the store of out[i].
template <class E>
OSENGINE_HD void epilogue_store(const E& e, float y, std::int64_t i) {
  const bool has_residual = e.residual != nullptr;
  y = epilogue_finish(e.activation, y, has_residual, has_residual ? load_float(e.residual, e.residual_dtype, i) : 0.0f);
  store_float(e.out, e.out_dtype, i, y);
}

}  // namespace osengine::detail
