// The online Hadamard rotation of QuantizeOptions::rotate on its own, for cross-checks and tools: y = x H_K / sqrt(K)
// per row, in fp32, in the operation order every quantize backend follows (see quantize.hpp and
// python/osengine/quant/hadamard.py, whose hadamard_transform it reproduces bit for bit).
#pragma once
#include <cstdint>

#include "osengine/tensor.hpp"

namespace osengine {

// Whether rows of n values can be rotated: n = m * 2^k with m = 1 or a Paley order <= 256.
bool is_hadamard_order(std::int64_t n);

// x: float32 [M, K] (CPU, contiguous); out: float32 [M, K] (may be x itself). K must be a Hadamard order
// (ArgumentError naming 'x' and the supported forms otherwise). Non-finite values propagate (no check).
void hadamard_transform(const TensorView& x, const TensorView& out);

}  // namespace osengine
