// Activation quantization on CUDA: one thread block per (row, group). The fused shift / scale, the dynamic range
// reduction (row or group min / max) and the rounding all happen in one kernel; the arithmetic is the reference's,
// in the same order, with round-to-nearest intrinsics.
#include <cuda_runtime.h>

#include <algorithm>

#include "backends/cuda/cuda_kernels.hpp"
#include "backends/cuda/device_math.cuh"

namespace osengine::detail::cuda {

namespace {

struct QuantizeParams {
  const void* x;
  DType x_dtype;
  std::int64_t k, group_size, groups;
  const float* shift;
  const float* smooth_scale;
  int qmin, qmax;
  bool symmetric, dynamic;
  const float* delta;
  const std::int32_t* zero_point;
  std::int64_t param_stride;
  float* out_delta;
  std::int32_t* out_zero_point;
  std::int8_t* codes;
};

__device__ __forceinline__ float transformed(const QuantizeParams& p, std::int64_t row, std::int64_t col) {
  float v = load_float(p.x, p.x_dtype, row * p.k + col);
  if (p.shift) v = __fsub_rn(v, p.shift[col]);
  if (p.smooth_scale) v = __fdiv_rn(v, p.smooth_scale[col]);
  return v;
}

constexpr int kMaxThreads = 256;

__global__ void __launch_bounds__(kMaxThreads) quantize_kernel(QuantizeParams p) {
  const std::int64_t row = blockIdx.y;
  const std::int64_t g = blockIdx.x;
  const std::int64_t begin = g * p.group_size, end = begin + p.group_size;
  float delta;
  std::int32_t zero_point;
  if (p.dynamic) {
    // The range always includes 0 (lo <= 0 <= hi). min / max are exact, so the reduction order does not matter.
    float lo = 0.0f, hi = 0.0f;
    for (std::int64_t col = begin + threadIdx.x; col < end; col += blockDim.x) {
      const float v = transformed(p, row, col);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
    }
    __shared__ float warp_lo[kMaxThreads / 32], warp_hi[kMaxThreads / 32];
    __shared__ float shared_delta;
    __shared__ std::int32_t shared_zero_point;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      warp_lo[warp] = lo;
      warp_hi[warp] = hi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
        lo = fminf(lo, warp_lo[w]);
        hi = fmaxf(hi, warp_hi[w]);
      }
      float d;
      std::int32_t zp = 0;
      if (p.symmetric) {
        d = __fdiv_rn(fmaxf(-lo, hi), static_cast<float>(p.qmax));
      } else {
        d = __fdiv_rn(__fsub_rn(hi, lo), static_cast<float>(p.qmax - p.qmin));
      }
      if (!(d > 0.0f)) d = 1.0f;
      if (!p.symmetric) {
        float z = __fsub_rn(static_cast<float>(p.qmin), rintf(__fdiv_rn(lo, d)));
        z = fminf(fmaxf(z, static_cast<float>(p.qmin)), static_cast<float>(p.qmax));
        zp = static_cast<std::int32_t>(z);
      }
      p.out_delta[row * p.groups + g] = d;
      p.out_zero_point[row * p.groups + g] = zp;
      shared_delta = d;
      shared_zero_point = zp;
    }
    __syncthreads();
    delta = shared_delta;
    zero_point = shared_zero_point;
  } else {
    delta = p.delta[g * p.param_stride];
    zero_point = p.zero_point ? p.zero_point[g * p.param_stride] : 0;
  }
  const float zp = static_cast<float>(zero_point);
  const float qmin = static_cast<float>(p.qmin), qmax = static_cast<float>(p.qmax);
  for (std::int64_t col = begin + threadIdx.x; col < end; col += blockDim.x) {
    float v = __fadd_rn(rintf(__fdiv_rn(transformed(p, row, col), delta)), zp);
    v = fminf(fmaxf(v, qmin), qmax);
    p.codes[row * p.k + col] = static_cast<std::int8_t>(v);
  }
}

}  // namespace

int quantize(const QuantizeProblem& problem, Stream stream) {
  QuantizeParams p{};
  p.x = problem.x;
  p.x_dtype = problem.x_dtype;
  p.k = problem.k;
  p.group_size = problem.group_size;
  p.groups = problem.k / problem.group_size;
  p.shift = problem.shift;
  p.smooth_scale = problem.smooth_scale;
  p.qmin = problem.qmin;
  p.qmax = problem.qmax;
  p.symmetric = problem.symmetric;
  p.dynamic = problem.dynamic;
  p.delta = problem.delta;
  p.zero_point = problem.zero_point;
  p.param_stride = problem.param_stride;
  p.out_delta = problem.out_delta;
  p.out_zero_point = problem.out_zero_point;
  p.codes = problem.codes;
  if (problem.m > 65535) {
    // gridDim.y is limited to 65535 rows per launch: launch row chunks (the kernel reads blockIdx.y as the row).
    for (std::int64_t row0 = 0; row0 < problem.m; row0 += 65535) {
      QuantizeProblem chunk = problem;
      const std::int64_t rows = std::min<std::int64_t>(65535, problem.m - row0);
      const std::int64_t groups = problem.k / problem.group_size;
      chunk.m = rows;
      if (problem.x_dtype == DType::float32)
        chunk.x = static_cast<const float*>(problem.x) + row0 * problem.k;
      else
        chunk.x = static_cast<const std::uint16_t*>(problem.x) + row0 * problem.k;
      chunk.codes = problem.codes + row0 * problem.k;
      if (problem.dynamic) {
        chunk.out_delta = problem.out_delta + row0 * groups;
        chunk.out_zero_point = problem.out_zero_point + row0 * groups;
      }
      if (const int err = quantize(chunk, stream)) return err;
    }
    return 0;
  }
  const int threads = static_cast<int>(std::min<std::int64_t>(kMaxThreads, (problem.group_size + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>(p.groups), static_cast<unsigned>(problem.m));
  quantize_kernel<<<grid, threads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace osengine::detail::cuda
