// The AVX2 backend's kernels (x86-64 AVX2 + FMA). Their files are compiled with -mavx2 -mfma and may only run after
// the CPU check in backends/registry.cpp (the table's available()).
#pragma once
#include "backends/kernels.hpp"

namespace osengine::detail {

std::int64_t quantize_avx2(const QuantizeProblem& problem);  // avx2/quantize.cpp
void gemm_avx2(const GemmProblem& problem);     // avx2/gemm.cpp: W8 or W4 by the weights' bits
void gemm_w8_avx2(const GemmProblem& problem);  // avx2/gemm_w8.cpp
void gemm_w4_avx2(const GemmProblem& problem);  // avx2/gemm_w4.cpp
ArrangedScales arrange_weight_scales_avx2(const float* scales, std::int64_t n, std::int64_t columns, int bits);
WeightLayout pack_weights_avx2(const std::int8_t* codes, std::int64_t n, std::int64_t k, int bits,
                               std::int64_t group_size);  // avx2/pack.cpp
void unpack_weights_avx2(const PackedWeights& weights, const std::int32_t* rows, std::int64_t count,
                         std::int8_t* codes);

}  // namespace osengine::detail
