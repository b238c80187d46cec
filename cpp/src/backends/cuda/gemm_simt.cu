// Fallback GEMM on CUDA cores: one warp per output element, any shape and alignment, int8 or int4 operands, groups,
// and the whole epilogue fused (the reference's arithmetic in the reference's order). Used where the tensor-core
// kernels' alignment rules do not hold, for archs without them, and for per-group scales with small groups.
#include <cuda_runtime.h>

#include <algorithm>

#include "backends/cuda/cuda_kernels.hpp"
#include "backends/cuda/device_math.cuh"

namespace osengine::detail::cuda {

namespace {

constexpr int kWarpsPerBlock = 8;

struct SimtParams {
  const std::int8_t* a;
  bool a_int4;
  std::int64_t m, n, k;
  const void* w;
  bool w_int4;
  const std::int32_t* column_sums;
  std::int64_t group, groups;
  Epilogue e;
  std::int32_t* accumulators;
};

__device__ __forceinline__ int a_at(const SimtParams& p, std::int64_t row, std::int64_t k) {
  if (p.a_int4) return int4_at(reinterpret_cast<const std::uint8_t*>(p.a) + row * (p.k / 2), k);
  return p.a[row * p.k + k];
}

__device__ __forceinline__ int w_at(const SimtParams& p, std::int64_t col, std::int64_t k) {
  if (p.w_int4) return int4_at(static_cast<const std::uint8_t*>(p.w) + col * (p.k / 2), k);
  return static_cast<const std::int8_t*>(p.w)[col * p.k + k];
}

__device__ __forceinline__ std::int32_t dot(const SimtParams& p, std::int64_t row, std::int64_t col, std::int64_t begin,
                                            std::int64_t end, int lane) {
  std::int32_t acc = 0;
  for (std::int64_t k = begin + lane; k < end; k += 32) acc += a_at(p, row, k) * w_at(p, col, k);
  // Integer sums are exact: the order of the reduction does not matter.
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  return acc;
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32) gemm_simt_kernel(SimtParams p) {
  const int lane = threadIdx.x % 32;
  const std::int64_t warp = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (warp >= p.m * p.n) return;  // the whole warp leaves together
  const std::int64_t row = warp / p.n, col = warp % p.n;
  if (p.accumulators) {
    const std::int32_t acc = dot(p, row, col, 0, p.k, lane);
    if (lane == 0) p.accumulators[row * p.n + col] = acc;
    return;
  }
  const Epilogue& e = p.e;
  float y = epilogue_start(e, col);
  for (std::int64_t g = 0; g < p.groups; ++g) {
    const std::int32_t acc = dot(p, row, col, g * p.group, (g + 1) * p.group, lane);
    y = epilogue_group_at(e, y, acc, p.column_sums[g * p.n + col], row, col, g);
  }
  if (lane == 0) epilogue_store(e, y, row * p.n + col);
}

}  // namespace

int gemm_simt(const std::int8_t* a, ActivationFormat a_format, std::int64_t m, std::int64_t n, std::int64_t k,
              const DeviceWeights& w, const Epilogue& e, std::int32_t* accumulators, Stream stream) {
  SimtParams p{};
  p.a = a;
  p.a_int4 = a_format == ActivationFormat::int4_packed;
  p.m = m;
  p.n = n;
  p.k = k;
  p.w = w.data;
  p.w_int4 = w.bits == 4;
  p.column_sums = w.column_sums;
  p.group = w.group_size > 0 ? w.group_size : k;
  p.groups = k / p.group;
  p.e = e;
  p.accumulators = accumulators;
  const std::int64_t blocks = (m * n + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  gemm_simt_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace osengine::detail::cuda
