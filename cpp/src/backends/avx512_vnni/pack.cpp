// The AVX-512 VNNI backend's weight layouts (see gemm_w8.cpp and gemm_w4.cpp): packing codes into them and reading
// codes back. Both use panels of 16 output channels and steps of one 64-byte zmm; the per-group scales of int4
// weights are arranged as the AVX2 backend arranges them (arrange_weight_scales_avx2: by panel, not by k).
#include <cstring>

#include "backends/avx2/gemm_common.hpp"
#include "backends/avx512_vnni/avx512_vnni.hpp"

namespace osengine::detail {

using namespace avx2_gemm;

namespace {

constexpr std::int64_t kW8StepK = 4, kW4StepK = 8, kStepBytes = 64;

// W8: byte of column c (0..15) at packed k index kp inside its panel.
std::int64_t w8_byte(std::int64_t c, std::int64_t kp) { return (kp / 4) * kStepBytes + c * 4 + kp % 4; }
// W4: byte of column c (0..15) at packed k index kp inside its panel; the low nibble for c < 8, else the high one.
std::int64_t w4_byte(std::int64_t c, std::int64_t kp) { return (kp / 8) * kStepBytes + (c % 8) * 8 + kp % 8; }

}  // namespace

WeightLayout pack_weights_avx512_vnni(const std::int8_t* codes, std::int64_t n, std::int64_t k, int bits,
                                      std::int64_t group_size) {
  const W4Shape shape = w4_shape(k, group_size, bits == 8 ? kW8StepK : kW4StepK);
  WeightLayout layout;
  layout.padded_n = round_up(n, kNR);
  layout.padded_k = shape.padded_k();
  const std::int64_t panel_bytes = shape.steps() * kStepBytes;
  if (bits == 8) {
    // Padding: weight 0. Row by row, group by group, four codes (one step of one column) at a time: this runs at
    // load for every layer.
    layout.data.assign(static_cast<std::size_t>(layout.padded_n / kNR * panel_bytes), 0);
    for (std::int64_t row = 0; row < n; ++row) {
      std::uint8_t* column = layout.data.data() + (row / kNR) * panel_bytes + (row % kNR) * 4;
      for (std::int64_t g = 0; g < shape.groups; ++g) {
        const std::int8_t* src = codes + row * k + g * shape.group_size;
        std::uint8_t* dst = column + g * shape.group_steps() * kStepBytes;
        std::int64_t i = 0;
        for (; i + 4 <= shape.group_size; i += 4) std::memcpy(dst + (i / 4) * kStepBytes, src + i, 4);
        for (; i < shape.group_size; ++i) dst[(i / 4) * kStepBytes + i % 4] = static_cast<std::uint8_t>(src[i]);
      }
    }
    return layout;
  }
  // W4: biased nibbles (w + 8); padding 8 (weight 0).
  layout.data.assign(static_cast<std::size_t>(layout.padded_n / kNR * panel_bytes), 0x88);
  for (std::int64_t row = 0; row < n; ++row) {
    std::uint8_t* base = layout.data.data() + (row / kNR) * panel_bytes;
    const std::int64_t c = row % kNR;
    for (std::int64_t g = 0; g < shape.groups; ++g) {
      const std::int8_t* src = codes + row * k + g * shape.group_size;
      for (std::int64_t i = 0; i < shape.group_size; ++i) {
        std::uint8_t& byte = base[w4_byte(c, g * shape.group_k + i)];
        const auto nib = static_cast<std::uint8_t>((src[i] + 8) & 0x0f);
        byte = c < 8 ? static_cast<std::uint8_t>((byte & 0xf0) | nib) : static_cast<std::uint8_t>((byte & 0x0f) | (nib << 4));
      }
    }
  }
  return layout;
}

void unpack_weights_avx512_vnni(const PackedWeights& w, const std::int32_t* rows, std::int64_t count,
                                std::int8_t* codes) {
  const std::int64_t k = w.k();
  const W4Shape shape = w4_shape(k, w.group_size(), w.bits() == 8 ? kW8StepK : kW4StepK);
  const std::int64_t panel_bytes = shape.steps() * kStepBytes;
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int64_t row = rows ? rows[i] : i;
    const std::int64_t c = row % kNR;
    const std::uint8_t* base = w.data() + (row / kNR) * panel_bytes;
    for (std::int64_t kk = 0; kk < k; ++kk) {
      const std::int64_t kp = shape.packed_k(kk);
      if (w.bits() == 8) {
        codes[i * k + kk] = static_cast<std::int8_t>(base[w8_byte(c, kp)]);
      } else {
        const std::uint8_t byte = base[w4_byte(c, kp)];
        codes[i * k + kk] = static_cast<std::int8_t>(((c < 8 ? byte : byte >> 4) & 0x0f) - 8);
      }
    }
  }
}

}  // namespace osengine::detail
