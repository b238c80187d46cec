// Device helpers of the CUDA kernels. The fp32 math and the epilogue steps are the host's own definitions
// (core/float_math.hpp, backends/epilogue.hpp: host/device functions with explicitly rounded operations), so the CUDA
// backend gives the same floats as the reference.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/epilogue.hpp"
#include "osengine/gemm.hpp"
#include "osengine/tensor.hpp"

namespace osengine::detail::cuda {

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
