// The contract between the ops (validation, dispatch) and the backends: each backend is one table of kernels
// (struct Kernels) registered in backends/registry.cpp, the only file that knows which backends a build contains.
// Kernels receive validated, contiguous raw buffers and never throw for data-dependent reasons; they report what
// they found instead.
#pragma once
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "core/hadamard.hpp"
#include "osengine/backend.hpp"
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
  // Online Hadamard rotation of each row (after the prologue, before the shift): `hadamard` is the plan of order k
  // (the op checked that k is supported).
  bool rotate = false;
  HadamardPlan hadamard{};
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
  // device backends: the GPU holding every buffer and the stream to queue the work on (0 = the default stream)
  int device_index = 0;
  std::uintptr_t stream = 0;

  std::int64_t x_row_elements() const { return x_stride > 0 ? x_stride : k; }
};

// The RMSNorm factor r = 1 / sqrt(sum(x^2) / k + eps) of one row x[k] (fp32, the summation order of quantize.hpp);
// not finite when the sum of squares overflows.
float rms_norm_factor(const float* x, std::int64_t k, float eps);

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
  // The same scales in the backend's own arrangement (Kernels::arrange_weight_scales) when the weights carry them
  // and the backend made one, as float32 or (every value exactly representable) float16 bits; else both null.
  const float* w_scale_arranged = nullptr;
  const std::uint16_t* w_scale_arranged_f16 = nullptr;
  const float* bias = nullptr;  // [n] or null
  const void* residual = nullptr;  // [m, n] or null
  DType residual_dtype = DType::float32;
  Activation activation = Activation::none;
  void* out = nullptr;  // [m, n]
  DType out_dtype = DType::float32;
  std::uintptr_t stream = 0;  // device backends: the stream to queue the work on (0 = the default stream)
};

// A backend's arrangement of the scales weights carry: float32 values, or float16 bits when every value is exactly
// a float16 (half the bytes for the same numbers), or neither.
struct ArrangedScales {
  std::vector<float> f32;
  std::vector<std::uint16_t> f16;
};

// Weight layouts. `codes` are int8 [n, k] (int4 values already sign-extended to int8).
struct WeightLayout {
  CacheLineBytes data;
  std::int64_t padded_n = 0, padded_k = 0;
};

// One backend: what the ops call once they have validated their arguments.
struct Kernels {
  std::string name;        // "reference", "avx2", "avx512_vnni", "cuda", or a registered variant's own name
  Backend id = Backend::reference;  // the public Backend it implements (a variant names the one it stands for)
  Device device = Device::cpu;      // where its operands live
  bool (*available)() = nullptr;    // whether it can run on this machine (CPU features, a GPU)
  // Returns the first row whose transformed values y = (x - shift) / smooth_scale (after the prologue and the
  // rotation) hold a NaN or Inf, or -1 (rows after a non-finite one may or may not have been written; device
  // backends do not check: always -1).
  std::int64_t (*quantize)(const QuantizeProblem& problem) = nullptr;
  void (*gemm)(const GemmProblem& problem) = nullptr;
  WeightLayout (*pack_weights)(const std::int8_t* codes, std::int64_t n, std::int64_t k, int bits,
                               std::int64_t group_size) = nullptr;
  // Optional (CPU backends): the scales that `bits`-bit weights carry, [n, columns] row-major (columns = 1 or the
  // number of groups), rearranged once at pack time for the GEMM to read in its own order.
  ArrangedScales (*arrange_weight_scales)(const float* scales, std::int64_t n, std::int64_t columns, int bits) = nullptr;
  // Unpack `count` rows (rows[i], or 0..count-1 when rows is null) into codes [count, k] (host layouts).
  void (*unpack_weights)(const PackedWeights& weights, const std::int32_t* rows, std::int64_t count,
                         std::int8_t* codes) = nullptr;
  // Device backends only: the layout lives in device memory (load time, synchronous). upload returns an owning
  // pointer that frees on release.
  std::shared_ptr<void> (*upload)(const void* host, std::size_t bytes, int device_index) = nullptr;
  void (*download)(const void* device, void* host, std::size_t bytes, int device_index) = nullptr;
  int (*current_device)() = nullptr;
};

// Adds a backend, or replaces the one of the same name (its address stays valid: PackedWeights keep a pointer).
// Not thread-safe: register at start-up (the built-in backends) or in tests (variants), before packing with it.
void register_backend(const Kernels& kernels);
// Every registered backend, in registration order (reference first), available here or not.
const std::deque<Kernels>& registered_kernels();
// The backend registered under `name`, or null.
const Kernels* find_kernels(const std::string& name);
// The registered backend that implements `backend` under its own name; UnsupportedError when this build lacks it.
const Kernels& kernels_for(Backend backend, const char* op);
// The CPU backend that `name` selects for CPU data: "auto" (the best built-in one here), a built-in name (with
// resolve_cpu_backend's errors), or a name registered at run time (ArgumentError when nothing is registered under
// it, UnsupportedError when it cannot run here).
const Kernels& resolve_cpu_kernels(const std::string& name, const char* op);
// Packs int8 codes [n, k] (int4 values sign-extended) for `kernels` (tests use it for registered variants).
PackedWeights pack_weights_with(const Kernels& kernels, const std::int8_t* codes, std::int64_t n, std::int64_t k,
                                int bits, std::int64_t group_size, int device_index = -1);

// Each backend declares its own kernels in its folder (backends/<name>/<name>.hpp); registry.cpp builds its table.

}  // namespace osengine::detail
