// Device helpers of the CUDA kernels. The fp32 math, the epilogue steps and the float loads / stores are the host's
// own definitions (core/float_math.hpp, backends/epilogue.hpp: host/device functions with explicitly rounded
// operations), so the CUDA backend gives the same floats as the reference.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/epilogue.hpp"
#include "osengine/gemm.hpp"
#include "osengine/tensor.hpp"

namespace osengine::detail::cuda {

// Signed int4 code k of a row packed two per byte (element 2i in the low nibble).
__device__ __forceinline__ int int4_at(const std::uint8_t* row, std::int64_t k) {
  const int byte = row[k >> 1];
  const int nibble = (k & 1) ? (byte >> 4) : (byte & 0x0f);
  return nibble >= 8 ? nibble - 16 : nibble;
}

}  // namespace osengine::detail::cuda
