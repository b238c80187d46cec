// The reference backend: scalar C++, the oracle every other backend is compared with (tests call it directly).
// Its weight layout is the public one: int8 codes [n, k], or int4 two per byte [n, k / 2].
#pragma once
#include "backends/kernels.hpp"

namespace osengine::detail {

std::int64_t quantize_reference(const QuantizeProblem& problem);  // reference/quantize.cpp
void gemm_reference(const GemmProblem& problem);                  // reference/gemm.cpp
WeightLayout pack_weights_reference(const std::int8_t* codes, std::int64_t n, std::int64_t k, int bits,
                                    std::int64_t group_size);
void unpack_weights_reference(const PackedWeights& weights, const std::int32_t* rows, std::int64_t count,
                              std::int8_t* codes);

}  // namespace osengine::detail
