// The shift-add epilogue over int32 accumulators written by a tensor-core GEMM: zero-point correction with the weight
// column sums, per-token x per-channel (or per-group) scales, bias (the folded OS+ shift), activation, residual, and
// the store in float32 / bfloat16 / float16. Elementwise and memory-bound; the arithmetic is backends/epilogue.hpp's.
#include <cuda_runtime.h>

#include <algorithm>

#include "backends/cuda/cuda_kernels.hpp"
#include "backends/cuda/device_math.cuh"

namespace osengine::detail::cuda {

namespace {

constexpr int kThreads = 256;

struct EpilogueParams {
  const std::int32_t* acc;
  std::int64_t m, n, group, groups;
  const std::int32_t* column_sums;
  Epilogue e;
  float* y;
};

__global__ void __launch_bounds__(kThreads) epilogue_kernel(EpilogueParams p) {
  const std::int64_t total = p.m * p.n;
  const Epilogue& e = p.e;
  const std::int64_t g = p.group;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * kThreads) {
    const std::int64_t row = i / p.n, col = i % p.n;
    float y = g == 0 ? epilogue_start(e, col) : p.y[i];
    y = epilogue_group_at(e, y, p.acc[i], p.column_sums[g * p.n + col], row, col, g);
    if (g + 1 < p.groups) {
      p.y[i] = y;
      continue;
    }
    epilogue_store(e, y, i);
  }
}

}  // namespace

int epilogue(const std::int32_t* acc, std::int64_t m, std::int64_t n, std::int64_t group, std::int64_t groups,
             const std::int32_t* column_sums, const Epilogue& e, float* y, Stream stream) {
  EpilogueParams p{acc, m, n, group, groups, column_sums, e, y};
  const std::int64_t total = m * n;
  const std::int64_t blocks = std::min<std::int64_t>((total + kThreads - 1) / kThreads, 65536);
  epilogue_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace osengine::detail::cuda
