// Activation quantization with a fused OS+ shift and scale (and optionally the RMSNorm that produces x):
//
//     x = rms_norm_weight[k] * (x * r),  r = 1 / sqrt(sum_k(x^2) / K + eps)   (optional, see QuantizeOptions)
//     x = silu(gate[k]) * up[k]  for x = [gate | up] of 2K columns            (optional, see QuantizeOptions)
//     x = x H_K / sqrt(K)        online Hadamard rotation of the whole row    (optional: QuantizeOptions::rotate)
//     y = (x - shift[k]) / smooth_scale[k]                 (both optional, per channel k of K)
//     q = clamp(round_half_even(y / delta) + zero_point, qmin, qmax)      stored as int8
//
// bits in 2..8. Symmetric: codes in [-(2^(b-1)-1), 2^(b-1)-1], zero_point == 0.
// Asymmetric: codes in [-2^(b-1), 2^(b-1)-1] with an integer zero_point in that range, so that
// x ~= delta * (q - zero_point); this keeps every bit width in a signed int8 (for b = 8 it is uint8 minus 128).
//
// Groups: group_size G (0 = one group spanning the row) splits each row into K/G groups with their own delta/zp.
// All arithmetic is IEEE fp32 in the order written above (true divisions), so every backend gives identical codes.
#pragma once
#include <cstdint>

#include "osengine/backend.hpp"
#include "osengine/tensor.hpp"

namespace osengine {

struct QuantizeOptions {
  int bits = 8;
  bool symmetric = true;
  std::int64_t group_size = 0;
  BackendChoice backend = Backend::automatic;
  // CUDA tensors (backend automatic or cuda; x and every other tensor on one GPU; x may also be float16): the
  // cudaStream_t to queue the work on, as an integer (0 = the default stream). Ignored on the CPU. On CUDA, non-finite
  // inputs are not reported (that would need a synchronization): their codes land inside the code range.
  std::uintptr_t stream = 0;
  // Optional RMSNorm of each row before the shift and scale (LLaMA-family norms whose output only feeds this
  // quantization: the normalized activations are never written out). float32 [K], CPU only. The sum of squares runs
  // in 8 interleaved fp32 partial sums (element k into partial k mod 8, each updated with fma), combined as
  // ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)); r = 1 / sqrt(sum / K + eps); every backend does the same.
  TensorView rms_norm_weight{};
  float rms_norm_eps = 1e-6f;
  // Optional SiLU gate before the shift and scale (LLaMA-family MLPs: the quantization of down_proj's input, fused
  // with the product that makes it): x holds [gate | up] as [M, 2K] and row m quantizes silu(gate) * up, silu as in
  // the GEMM epilogue (x / (1 + exp(-x)) with osengine's exp). out_codes, shift and smooth_scale are sized by K.
  // CPU only; not together with rms_norm_weight.
  bool silu_gate = false;
  // Optional online Hadamard rotation (QuaRot), after the rms_norm_weight / silu_gate prologue and before shift and
  // smooth_scale: each row x of K values becomes x H_K / sqrt(K) (H_K = kron(H_m, Sylvester_{2^k}), H_m = 1 or a
  // Paley matrix), computed in fp32 in the fixed order of python/osengine/quant/hadamard.py (butterflies, then the
  // dense H_m stage with its terms in order, then the scale), so every backend gives the same floats. The layer's
  // weight holds W H_K / sqrt(K), so that the product is unchanged. K must be m * 2^k with m = 1 or a Paley order
  // <= 256 (e.g. 576 = 36 * 16, 1536 = 12 * 128, 14336 = 28 * 512; not 11008), else ArgumentError naming 'rotate'.
  // Groups (group_size) split the rotated row. Works with either prologue, on every backend (CUDA: without them).
  bool rotate = false;
};

// Static (calibrated) quantization. x: [M, K] float32 or bfloat16, contiguous.
// shift, smooth_scale: optional float32 [K] (smooth_scale > 0). delta: float32 with one value, or [K/G] with groups.
// zero_point: optional int32, same shape as delta (must be 0 for symmetric). out_codes: int8 [M, K].
void quantize_static(const TensorView& x, const TensorView& shift, const TensorView& smooth_scale,
                     const TensorView& delta, const TensorView& zero_point, const TensorView& out_codes,
                     const QuantizeOptions& options);

// Dynamic per-token (per-row) quantization: delta and zero_point are computed from each row (or row group)
// of y and written out. out_delta: float32 [M] or [M, K/G]; out_zero_point: int32, same shape (written as 0
// for symmetric). Dynamic ranges always include 0. A row whose range is 0 gets delta = 1.
void quantize_dynamic(const TensorView& x, const TensorView& shift, const TensorView& smooth_scale,
                      const TensorView& out_codes, const TensorView& out_delta, const TensorView& out_zero_point,
                      const QuantizeOptions& options);

// Code range of a bit width.
struct CodeRange {
  int qmin;
  int qmax;
};
CodeRange code_range(int bits, bool symmetric);

}  // namespace osengine
