// Activation quantization on CUDA: one thread block per (row, group). The fused shift / scale, the dynamic range
// reduction (row or group min / max) and the rounding all happen in one kernel; the arithmetic is the reference's,
// in the same order, with round-to-nearest intrinsics.
//
// With the online Hadamard rotation (QuantizeProblem::rotate), one thread block per row: the row is loaded into
// shared memory (global scratch when it does not fit), the Sylvester butterflies run there stage by stage in the
// normative order (core/hadamard.hpp), and each rotated value is then computed where it is needed, its dense H_m sum
// over a = 0 .. m - 1 in order, times 1 / sqrt(k), then the shift and the smooth scale; the groups of the row follow
// one another in the block.
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

// ---- the rotated quantization: one block per row -------------------------------------------------------------

struct RotationParams {
  std::int64_t m, p;          // k = m * p, p = 2^log2_p
  HadamardKind kind;
  int q;                      // the Paley prime (0 when m = 1)
  float scale;                // float32(1 / sqrt(k))
  float* rows;                // global scratch [rows of this launch, k], or null: the row lives in shared memory
};

// Threads of a rotated-quantization block: a warp multiple (the min / max reduction shuffles whole warps).
constexpr int kRotateThreads = 256;

// The value the reference quantizes at column col of the butterflied row `v`: the dense stage's sum over a in order
// (signs from paley_entry, the host's definition of H_m), the scale, the shift and the smooth scale.
__device__ __forceinline__ float rotated_value(const QuantizeParams& p, const RotationParams& r, const float* v,
                                               const signed char* chi, std::int64_t col) {
  float acc;
  if (r.m == 1) {
    acc = v[col];
  } else {
    const int c = static_cast<int>(col / r.p);
    const std::int64_t b = col % r.p;
    acc = paley_entry(r.kind, r.q, chi, 0, c) > 0 ? v[b] : -v[b];
    for (int a = 1; a < r.m; ++a) {
      const float x = v[a * r.p + b];
      acc = paley_entry(r.kind, r.q, chi, a, c) > 0 ? __fadd_rn(acc, x) : __fsub_rn(acc, x);
    }
  }
  float y = __fmul_rn(acc, r.scale);
  if (p.shift) y = __fsub_rn(y, p.shift[col]);
  if (p.smooth_scale) y = __fdiv_rn(y, p.smooth_scale[col]);
  return y;
}

__global__ void __launch_bounds__(kRotateThreads) quantize_rotated_kernel(QuantizeParams p, RotationParams r) {
  extern __shared__ float shared_row[];
  __shared__ signed char chi[kMaxHadamardBaseOrder];
  __shared__ float warp_lo[kRotateThreads / 32], warp_hi[kRotateThreads / 32];
  __shared__ float shared_delta;
  __shared__ std::int32_t shared_zero_point;
  const std::int64_t row = blockIdx.x;
  const std::int64_t k = p.k;
  float* v = r.rows ? r.rows + row * k : shared_row;
  // the quadratic character of GF(q): chi[0] = 0, +1 on the nonzero squares, -1 elsewhere
  if (r.m > 1) {
    for (int i = threadIdx.x; i < r.q; i += blockDim.x) chi[i] = i == 0 ? 0 : -1;
    __syncthreads();
    for (int x = 1 + threadIdx.x; x < r.q; x += blockDim.x) chi[(x * x) % r.q] = 1;  // equal writes: no race
  }
  for (std::int64_t col = threadIdx.x; col < k; col += blockDim.x) v[col] = load_float(p.x, p.x_dtype, row * k + col);
  __syncthreads();
  // 1. Sylvester butterflies, one stage at a time over the whole row: pair t of a stage is (j, j + h) with
  // j = a p + (2h) (i / h) + i % h, a = t / (p / 2), i = t % (p / 2)
  const std::int64_t half = r.p / 2;
  for (std::int64_t h = 1; h < r.p; h *= 2) {
    for (std::int64_t t = threadIdx.x; t < k / 2; t += blockDim.x) {
      const std::int64_t a = t / half, i = t % half;
      const std::int64_t j = a * r.p + (i / h) * 2 * h + i % h;
      const float lo = v[j], hi = v[j + h];
      v[j] = __fadd_rn(lo, hi);
      v[j + h] = __fsub_rn(lo, hi);
    }
    __syncthreads();
  }
  // 2. per group: the range (dynamic), then the codes; the rotated values are computed again for the codes
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (std::int64_t g = 0; g < p.groups; ++g) {
    const std::int64_t begin = g * p.group_size, end = begin + p.group_size;
    float delta;
    std::int32_t zero_point;
    if (p.dynamic) {
      float lo = 0.0f, hi = 0.0f;  // the range always includes 0; min / max are exact in any order
      for (std::int64_t col = begin + threadIdx.x; col < end; col += blockDim.x) {
        const float y = rotated_value(p, r, v, chi, col);
        lo = fminf(lo, y);
        hi = fmaxf(hi, y);
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
      }
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
        if (p.symmetric)
          d = __fdiv_rn(fmaxf(-lo, hi), static_cast<float>(p.qmax));
        else
          d = __fdiv_rn(__fsub_rn(hi, lo), static_cast<float>(p.qmax - p.qmin));
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
      __syncthreads();  // warp_lo / shared_delta are rewritten by the next group
    } else {
      delta = p.delta[g * p.param_stride];
      zero_point = p.zero_point ? p.zero_point[g * p.param_stride] : 0;
    }
    const float zp = static_cast<float>(zero_point);
    const float qmin = static_cast<float>(p.qmin), qmax = static_cast<float>(p.qmax);
    for (std::int64_t col = begin + threadIdx.x; col < end; col += blockDim.x) {
      float q = __fadd_rn(rintf(__fdiv_rn(rotated_value(p, r, v, chi, col), delta)), zp);
      q = fminf(fmaxf(q, qmin), qmax);
      p.codes[row * k + col] = static_cast<std::int8_t>(q);
    }
  }
}

// Launches the rotated kernel over every row: the row in shared memory when the device allows that many bytes per
// block, else in a stream-ordered global scratch (rows in launches of at most kScratchRows).
int quantize_rotated(const QuantizeProblem& problem, const QuantizeParams& params, cudaStream_t stream) {
  const HadamardPlan& plan = problem.hadamard;
  RotationParams r{plan.m, plan.p, plan.kind, plan.q, plan.scale, nullptr};
  const std::int64_t pairs = std::max<std::int64_t>(32, (problem.k / 2 + 31) / 32 * 32);  // a warp multiple
  const int threads = static_cast<int>(std::min<std::int64_t>(kRotateThreads, pairs));
  const std::size_t row_bytes = static_cast<std::size_t>(problem.k) * sizeof(float);
  int device = 0, optin = 0;
  if (const cudaError_t e = cudaGetDevice(&device)) return static_cast<int>(e);
  if (const cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device))
    return static_cast<int>(e);
  // static shared memory of the kernel (chi, reduction) counts against the same limit
  constexpr std::size_t kStaticBytes = 1024;
  if (row_bytes + kStaticBytes <= static_cast<std::size_t>(optin)) {
    if (row_bytes > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(quantize_rotated_kernel,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(row_bytes));
      if (e != cudaSuccess) return static_cast<int>(e);
    }
    quantize_rotated_kernel<<<static_cast<unsigned>(problem.m), threads, row_bytes, stream>>>(params, r);
    return static_cast<int>(cudaGetLastError());
  }
  constexpr std::int64_t kScratchRows = 1024;
  const std::int64_t chunk = std::min<std::int64_t>(kScratchRows, problem.m);
  void* scratch = nullptr;
  if (const cudaError_t e = cudaMallocAsync(&scratch, static_cast<std::size_t>(chunk) * row_bytes, stream))
    return static_cast<int>(e);
  r.rows = static_cast<float*>(scratch);
  int error = 0;
  for (std::int64_t row0 = 0; row0 < problem.m && error == 0; row0 += chunk) {
    // the launches of one stream run one after the other: they share the scratch
    QuantizeParams part = params;
    const std::int64_t rows = std::min<std::int64_t>(chunk, problem.m - row0);
    part.x = static_cast<const char*>(params.x) +
             static_cast<std::size_t>(row0 * problem.k) * dtype_size(problem.x_dtype);
    part.codes = params.codes + row0 * problem.k;
    if (problem.dynamic) {
      part.out_delta = params.out_delta + row0 * params.groups;
      part.out_zero_point = params.out_zero_point + row0 * params.groups;
    }
    quantize_rotated_kernel<<<static_cast<unsigned>(rows), threads, 0, stream>>>(part, r);
    error = static_cast<int>(cudaGetLastError());
  }
  const cudaError_t freed = cudaFreeAsync(scratch, stream);
  return error != 0 ? error : static_cast<int>(freed);
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
  if (problem.rotate) return quantize_rotated(problem, p, static_cast<cudaStream_t>(stream));
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
