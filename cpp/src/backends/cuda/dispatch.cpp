// CUDA backend, host side: device memory of packed weights, and the choice of kernel per call (tensor-core CUTLASS
// GEMM + shift-add epilogue where the architecture and the alignment allow it, the CUDA-core fallback otherwise).
// Every launch goes onto the caller's stream; nothing here synchronizes except the load-time weight upload / download.
#include <cuda_runtime.h>

#include <array>
#include <mutex>
#include <string>

#include "backends/cuda/cuda.hpp"
#include "backends/cuda/cuda_kernels.hpp"
#include "backends/kernels.hpp"
#include "osengine/errors.hpp"

namespace osengine::detail {

namespace {

[[noreturn]] void throw_cuda(const char* op, const char* what, int error) {
  throw UnsupportedError(std::string("osengine.") + op + ": CUDA error in " + what + ": " +
                         cudaGetErrorString(static_cast<cudaError_t>(error)));
}

void check_cuda(const char* op, const char* what, int error) {
  if (error != 0) throw_cuda(op, what, error);
}

// Makes `device` current for the scope of one op and restores the caller's device afterwards.
class DeviceGuard {
 public:
  DeviceGuard(const char* op, int device) {
    check_cuda(op, "cudaGetDevice", cudaGetDevice(&previous_));
    if (previous_ != device) check_cuda(op, "cudaSetDevice", cudaSetDevice(device));
    device_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0, device_ = 0;
};

// Compute capability major * 10 + minor, cached per device.
int compute_capability(const char* op, int device) {
  static std::mutex mutex;
  static std::array<int, 64> cache{};
  if (device < 0 || device >= static_cast<int>(cache.size())) return 0;
  const std::lock_guard<std::mutex> lock(mutex);
  if (cache[static_cast<std::size_t>(device)] == 0) {
    int major = 0, minor = 0;
    check_cuda(op, "cudaDeviceGetAttribute", cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    check_cuda(op, "cudaDeviceGetAttribute", cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    cache[static_cast<std::size_t>(device)] = major * 10 + minor;
  }
  return cache[static_cast<std::size_t>(device)];
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// Stream-ordered scratch memory, freed on the same stream when the op returns.
class Scratch {
 public:
  Scratch(const char* op, std::size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes > 0) check_cuda(op, "cudaMallocAsync", cudaMallocAsync(&ptr_, bytes, stream));
  }
  ~Scratch() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

enum class TensorCoreKernel { none, sm80_s8, sm80_s4, sm80_s8s4, sm90_s8 };

// The tensor-core kernel for this problem, or none (the CUDA-core fallback then runs).
TensorCoreKernel pick_kernel(const GemmProblem& p, int capability) {
  const PackedWeights& w = *p.weights;
  const std::int64_t group = w.group_size() > 0 ? w.group_size() : p.k;
  const bool int8_operands = p.a_format == ActivationFormat::int8 && w.bits() == 8;
  const bool int4_operands = p.a_format == ActivationFormat::int4_packed && w.bits() == 4;
  const bool int4_weights = p.a_format == ActivationFormat::int8 && w.bits() == 4;
  // Output tiles store int32 in 16-byte vectors: N % 4. Operands: 16-byte aligned rows and group slices.
  if (p.n % 4 != 0 || !aligned16(p.a) || !aligned16(w.device_data())) return TensorCoreKernel::none;
  // Raw accumulators are stored straight into the caller's tensor, which may be an offset view.
  if (p.out_accumulators && !aligned16(p.out_accumulators)) return TensorCoreKernel::none;
  if (int8_operands && p.k % 16 == 0 && group % 16 == 0) {
#ifdef OSENGINE_CUDA_SM90
    if (capability == 90) return TensorCoreKernel::sm90_s8;
#endif
#ifdef OSENGINE_CUDA_SM80
    if (capability >= 80) return TensorCoreKernel::sm80_s8;
#endif
  }
  // int4 x int4 tensor cores exist on sm_8x only (sm_90 emulates mma.sync s4): Hopper takes the fallback.
  if (int4_operands && p.k % 32 == 0 && group % 32 == 0) {
#ifdef OSENGINE_CUDA_SM80
    if (capability >= 80 && capability < 90) return TensorCoreKernel::sm80_s4;
#endif
  }
  // W4A8: int4 weights upcast to int8 in registers (on sm_90 through the compute_80 PTX; int8 mma.sync is native).
  if (int4_weights && p.k % 32 == 0 && group % 32 == 0) {
#ifdef OSENGINE_CUDA_SM80
    if (capability >= 80) return TensorCoreKernel::sm80_s8s4;
#endif
  }
  (void)capability;
  return TensorCoreKernel::none;
}

// int32 accumulators of one K slice [k0, k0 + kk) into acc [m, n]. Returns -1 if the kernel refused the problem.
int run_tensor_core(TensorCoreKernel kernel, const GemmProblem& p, std::int64_t k0, std::int64_t kk, std::int32_t* acc,
                    cudaStream_t stream) {
  const void* w = p.weights->device_data();
  const cuda::Stream s = stream;
  switch (kernel) {
    case TensorCoreKernel::sm80_s8:
      return cuda::gemm_sm80_s8(p.a + k0, p.k, static_cast<const std::int8_t*>(w) + k0, p.k, acc, p.m, p.n, kk, s);
    case TensorCoreKernel::sm90_s8:
      return cuda::gemm_sm90_s8(p.a + k0, p.k, static_cast<const std::int8_t*>(w) + k0, p.k, acc, p.m, p.n, kk, s);
    case TensorCoreKernel::sm80_s4:
      return cuda::gemm_sm80_s4(p.a + k0 / 2, p.k, static_cast<const std::uint8_t*>(w) + k0 / 2, p.k, acc, p.m, p.n,
                                kk, s);
    case TensorCoreKernel::sm80_s8s4:
      return cuda::gemm_sm80_s8s4(p.a + k0, p.k, static_cast<const std::uint8_t*>(w) + k0 / 2, p.k, acc, p.m, p.n, kk,
                                  s);
    case TensorCoreKernel::none: break;
  }
  return -1;
}

}  // namespace

void gemm_cuda(const GemmProblem& p) {
  const std::uintptr_t stream_handle = p.stream;
  const char* op = p.out_accumulators ? "gemm_accumulate" : "gemm";
  const PackedWeights& w = *p.weights;
  const DeviceGuard guard(op, w.device_index());
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const cuda::DeviceWeights dw{w.device_data(), w.device_column_sums(), w.bits(), w.group_size()};
  cuda::Epilogue e;
  e.a_scale = p.a_scale;
  e.a_scale_stride_m = p.a_scale_stride_m;
  e.a_scale_stride_g = p.a_scale_stride_g;
  e.a_zero_point = p.a_zero_point;
  e.w_scale = p.w_scale;
  e.w_scale_stride_n = p.w_scale_stride_n;
  e.w_scale_stride_g = p.w_scale_stride_g;
  e.bias = p.bias;
  e.residual = p.residual;
  e.residual_dtype = p.residual_dtype;
  e.activation = p.activation;
  e.out = p.out;
  e.out_dtype = p.out_dtype;

  const TensorCoreKernel kernel = pick_kernel(p, compute_capability(op, w.device_index()));
  if (kernel != TensorCoreKernel::none) {
    if (p.out_accumulators) {
      const int result = run_tensor_core(kernel, p, 0, p.k, p.out_accumulators, stream);
      if (result == 0) return;
      if (result > 0) throw_cuda(op, "the tensor-core GEMM", result);
    } else {
      const std::int64_t group = w.group_size() > 0 ? w.group_size() : p.k;
      const std::int64_t groups = p.k / group;
      const std::size_t mn = static_cast<std::size_t>(p.m * p.n);
      const Scratch acc(op, mn * sizeof(std::int32_t), stream);
      const Scratch y(op, groups > 1 ? mn * sizeof(float) : 0, stream);
      int result = 0;
      for (std::int64_t g = 0; g < groups && result == 0; ++g) {
        result = run_tensor_core(kernel, p, g * group, group, acc.as<std::int32_t>(), stream);
        if (result == 0)
          check_cuda(op, "the epilogue", cuda::epilogue(acc.as<std::int32_t>(), p.m, p.n, g, groups,
                                                          dw.column_sums, e, y.as<float>(), stream));
      }
      if (result == 0) return;
      if (result > 0) throw_cuda(op, "the tensor-core GEMM", result);
      // result < 0: CUTLASS refused the shape before anything ran (first group); take the fallback below.
    }
  }
  check_cuda(op, "the CUDA-core GEMM",
             cuda::gemm_simt(p.a, p.a_format, p.m, p.n, p.k, dw, e, p.out_accumulators, stream));
}

std::int64_t quantize_cuda(const QuantizeProblem& p) {
  const char* op = p.dynamic ? "quantize_dynamic" : "quantize_static";
  const DeviceGuard guard(op, p.device_index);
  check_cuda(op, "the quantize kernel", cuda::quantize(p, reinterpret_cast<cudaStream_t>(p.stream)));
  return -1;
}

bool cuda_device_present() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

int cuda_current_device() {
  int device = 0;
  check_cuda("pack_weights", "cudaGetDevice", cudaGetDevice(&device));
  return device;
}

std::shared_ptr<void> cuda_upload(const void* host, std::size_t bytes, int device_index) {
  const DeviceGuard guard("pack_weights", device_index);
  void* ptr = nullptr;
  check_cuda("pack_weights", "cudaMalloc", cudaMalloc(&ptr, bytes > 0 ? bytes : 1));
  std::shared_ptr<void> owned(ptr, [device_index](void* q) {
    int previous = 0;
    if (cudaGetDevice(&previous) != cudaSuccess) return;  // the runtime is shutting down
    if (previous != device_index) cudaSetDevice(device_index);
    cudaFree(q);
    if (previous != device_index) cudaSetDevice(previous);
  });
  check_cuda("pack_weights", "cudaMemcpy", cudaMemcpy(ptr, host, bytes, cudaMemcpyHostToDevice));
  return owned;
}

void cuda_download(const void* device, void* host, std::size_t bytes, int device_index) {
  const DeviceGuard guard("PackedWeights.unpack", device_index);
  check_cuda("PackedWeights.unpack", "cudaMemcpy", cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost));
}

}  // namespace osengine::detail
