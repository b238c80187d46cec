// Device twins of common/float_math.hpp and the epilogue, operation by operation, with explicit round-to-nearest
// intrinsics (__fmaf_rn, __fmul_rn, __fdiv_rn, ...) so that nvcc cannot contract or reorder them: the CUDA backend gives
// the same floats as the reference.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "osengine/gemm.hpp"
#include "osengine/tensor.hpp"

namespace osengine::detail::cuda {

__device__ __forceinline__ float exp_approx_d(float x) {
  constexpr float lo = -87.3f, hi = 88.7f;
  constexpr float log2e = 1.44269504088896341f;
  constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  constexpr float c7 = 1.0f / 5040, c6 = 1.0f / 720, c5 = 1.0f / 120, c4 = 1.0f / 24, c3 = 1.0f / 6, c2 = 0.5f;
  x = fminf(fmaxf(x, lo), hi);
  const float n = rintf(__fmul_rn(x, log2e));
  float r = __fmaf_rn(n, -ln2_hi, x);
  r = __fmaf_rn(n, -ln2_lo, r);
  float p = c7;
  p = __fmaf_rn(p, r, c6);
  p = __fmaf_rn(p, r, c5);
  p = __fmaf_rn(p, r, c4);
  p = __fmaf_rn(p, r, c3);
  p = __fmaf_rn(p, r, c2);
  p = __fmaf_rn(p, r, 1.0f);
  p = __fmaf_rn(p, r, 1.0f);
  const std::uint32_t scale_bits = static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127) << 23;
  return __fmul_rn(p, __uint_as_float(scale_bits));
}

__device__ __forceinline__ float erf_approx_d(float x) {
  constexpr float p = 0.3275911f, a1 = 0.254829592f, a2 = -0.284496736f, a3 = 1.421413741f, a4 = -1.453152027f,
                  a5 = 1.061405429f;
  const float ax = fabsf(x);
  const float t = __fdiv_rn(1.0f, __fmaf_rn(p, ax, 1.0f));
  float poly = a5;
  poly = __fmaf_rn(poly, t, a4);
  poly = __fmaf_rn(poly, t, a3);
  poly = __fmaf_rn(poly, t, a2);
  poly = __fmaf_rn(poly, t, a1);
  poly = __fmul_rn(poly, t);
  const float y = __fsub_rn(1.0f, __fmul_rn(poly, exp_approx_d(-__fmul_rn(ax, ax))));
  return copysignf(y, x);
}

__device__ __forceinline__ float gelu_approx_d(float x) {
  return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, erf_approx_d(__fmul_rn(x, 0.707106781186547524f))));
}

__device__ __forceinline__ float gelu_tanh_approx_d(float x) {
  const float u = __fmul_rn(0.797884560802865356f, __fmaf_rn(__fmul_rn(0.044715f, x), __fmul_rn(x, x), x));
  const float tanh_u = __fsub_rn(1.0f, __fdiv_rn(2.0f, __fadd_rn(exp_approx_d(__fmul_rn(2.0f, u)), 1.0f)));
  return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, tanh_u));
}

__device__ __forceinline__ float silu_approx_d(float x) {
  return __fdiv_rn(x, __fadd_rn(1.0f, exp_approx_d(-x)));
}

__device__ __forceinline__ float apply_activation_d(Activation activation, float x) {
  switch (activation) {
    case Activation::none: return x;
    case Activation::relu: return fmaxf(x, 0.0f);
    case Activation::gelu: return gelu_approx_d(x);
    case Activation::gelu_tanh: return gelu_tanh_approx_d(x);
    case Activation::silu: return silu_approx_d(x);
  }
  return x;
}

// Loads / stores of the float formats the ops accept.
__device__ __forceinline__ float load_float(const void* base, DType dtype, std::int64_t i) {
  switch (dtype) {
    case DType::bfloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case DType::float16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_float(void* base, DType dtype, std::int64_t i, float v) {
  switch (dtype) {
    case DType::bfloat16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); break;
    case DType::float16: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(base)[i] = v; break;
  }
}

// Signed int4 code k of a row packed two per byte (element 2i in the low nibble).
__device__ __forceinline__ int int4_at(const std::uint8_t* row, std::int64_t k) {
  const int byte = row[k >> 1];
  const int nibble = (k & 1) ? (byte >> 4) : (byte & 0x0f);
  return nibble >= 8 ? nibble - 16 : nibble;
}

}  // namespace osengine::detail::cuda
