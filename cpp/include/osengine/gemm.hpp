// Quantized GEMMs with the fused OS+ "shift-add" epilogue.
//
//   acc_g[m, n] = sum_{k in group g} A[m, k] * W[n, k]          exact int32 (K <= 65536 keeps every step exact)
//   c_g[m, n]   = acc_g[m, n] - a_zero_point[m, g] * colsum_w[g, n] exact int32
//   y           = bias[n]
//   y           = fma(float(c_g), a_scale[m, g] * w_scale[n, g], y)  for g = 0, 1, ... in order
//   out[m, n]   = act(y) + residual[m, n]
//
// Without groups there is a single group spanning K (weights packed with group_size 0), so
// out = act(a_scale[m] * w_scale[n] * (acc - a_zp[m] * colsum_w[n]) + bias[n]) + residual, with one fma.
//
// bias carries the folded OS+ shift (W z): that is the "shift-add". a_scale / a_zero_point may be one value, per
// token [M] or per token and group [M, K/G]; w_scale one value, per channel [N] or per channel and group [N, K/G].
// Activation: none, relu, gelu (erf form), gelu_tanh, silu, computed with osengine's own fp32 approximations
// (max abs error about 1e-7 relative to the input scale) identically on every backend.
#pragma once
#include <cstdint>
#include <string>

#include "osengine/packed_weights.hpp"
#include "osengine/tensor.hpp"

namespace osengine {

enum class Activation { none, relu, gelu, gelu_tanh, silu };
const char* activation_name(Activation activation);
Activation parse_activation(const std::string& name);

// The activations' storage format.
enum class ActivationFormat {
  int8,         // int8 codes [M, K]
  int4_packed,  // int4 codes packed two per byte [M, K/2] (W4A4)
};

struct GemmArgs {
  TensorView a;                 // see a_format
  ActivationFormat a_format = ActivationFormat::int8;
  TensorView a_scale;           // float32: one value, [M] or [M, K/G]
  TensorView a_zero_point;      // optional int32, same shape as a_scale
  TensorView w_scale;           // float32: one value, [N] or [N, K/G]; not given when the weights carry their scales
  TensorView bias;              // optional float32 [N]
  TensorView residual;          // optional float32 or bfloat16 [M, N]
  Activation activation = Activation::none;
  TensorView out;               // float32 or bfloat16 [M, N] (CUDA: float16 too, for out and residual)
  // CUDA backend (weights packed for Backend::cuda; every tensor then on the weights' GPU): the cudaStream_t to
  // queue the work on, as an integer (0 = the default stream). Ignored on the CPU.
  std::uintptr_t stream = 0;
};

// Runs on the backend the weights were packed for. Throws ArgumentError / DTypeError on bad input.
void gemm(const GemmArgs& args, const PackedWeights& weights);

// The raw int32 accumulators acc[m, n] (no epilogue): out int32 [M, N]. For tests and for measuring the epilogue.
void gemm_accumulate(const TensorView& a, ActivationFormat a_format, const PackedWeights& weights,
                     const TensorView& out, std::uintptr_t stream = 0);

}  // namespace osengine
