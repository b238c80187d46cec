// int4 packing: two signed 4-bit codes per byte, element 2i in the low nibble, 2i+1 in the high nibble,
// along the last dimension. This is the public interchange format; the GEMM kernels repack weights into
// their own layouts (see PackedWeights).
#pragma once
#include "osengine/tensor.hpp"

namespace osengine {

// codes: int8 [..., K] with values in [-8, 7] and K even; out: uint8 [..., K/2].
void pack_int4(const TensorView& codes, const TensorView& out);
// packed: uint8 or int8 [..., K/2]; out: int8 [..., K].
void unpack_int4(const TensorView& packed, const TensorView& out);

}  // namespace osengine
