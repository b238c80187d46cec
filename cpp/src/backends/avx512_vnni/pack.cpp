// The AVX-512 VNNI backend's weight layouts: its own for int8 weights (see gemm_w8.cpp), the AVX2 backend's for
// int4 weights (gemm_w4.cpp multiplies it with vpdpbusd).
#include <cstring>

#include "backends/avx2/gemm_common.hpp"
#include "backends/avx512_vnni/avx512_vnni.hpp"

namespace osengine::detail {

using namespace avx2_gemm;

namespace {

// Byte of W8 element (column c of its 16-column panel, packed k index kp) inside its panel.
std::int64_t w8_byte(std::int64_t c, std::int64_t kp) { return (kp / 4) * 64 + c * 4 + kp % 4; }

}  // namespace

WeightLayout pack_weights_avx512_vnni(const std::int8_t* codes, std::int64_t n, std::int64_t k, int bits,
                                      std::int64_t group_size) {
  if (bits == 4) return pack_weights_avx2(codes, n, k, bits, group_size);
  // W8: panels of 16 output channels; K padded per group to a multiple of 4 (the W4 shape) with zero weights.
  const W4Shape shape = w4_shape(k, group_size);
  WeightLayout layout;
  layout.padded_n = round_up(n, kNR);
  layout.padded_k = shape.padded_k();
  const std::int64_t panel_bytes = shape.steps() * 64;
  layout.data.assign(static_cast<std::size_t>(layout.padded_n / kNR * panel_bytes), 0);
  // Row by row, group by group, four codes (one step of one column) at a time: this runs at load for every layer.
  for (std::int64_t row = 0; row < n; ++row) {
    std::uint8_t* column = layout.data.data() + (row / kNR) * panel_bytes + (row % kNR) * 4;
    for (std::int64_t g = 0; g < shape.groups; ++g) {
      const std::int8_t* src = codes + row * k + g * shape.group_size;
      std::uint8_t* dst = column + g * (shape.group_k / 4) * 64;
      std::int64_t i = 0;
      for (; i + 4 <= shape.group_size; i += 4) std::memcpy(dst + (i / 4) * 64, src + i, 4);
      for (; i < shape.group_size; ++i) dst[(i / 4) * 64 + i % 4] = static_cast<std::uint8_t>(src[i]);
    }
  }
  return layout;
}

void unpack_weights_avx512_vnni(const PackedWeights& w, const std::int32_t* rows, std::int64_t count,
                                std::int8_t* codes) {
  if (w.bits() == 4) return unpack_weights_avx2(w, rows, count, codes);
  const std::int64_t k = w.k();
  const W4Shape shape = w4_shape(k, w.group_size());
  const std::int64_t panel_bytes = shape.steps() * 64;
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int64_t row = rows ? rows[i] : i;
    const std::uint8_t* base = w.data() + (row / kNR) * panel_bytes;
    for (std::int64_t kk = 0; kk < k; ++kk)
      codes[i * k + kk] = static_cast<std::int8_t>(base[w8_byte(row % kNR, shape.packed_k(kk))]);
  }
}

}  // namespace osengine::detail
