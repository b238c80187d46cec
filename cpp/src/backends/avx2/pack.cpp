// The AVX2 backend's weight layouts (see gemm_w8.cpp and gemm_w4.cpp): packing codes into them and reading codes back.
#include "backends/avx2/gemm_common.hpp"

namespace osengine::detail {

using namespace avx2_gemm;

WeightLayout pack_weights_avx2(const std::int8_t* codes, std::int64_t n, std::int64_t k, int bits,
                               std::int64_t group_size) {
  WeightLayout layout;
  layout.padded_n = round_up(n, kNR);
  if (bits == 8) {
    layout.padded_k = round_up(k, 2);
    const std::int64_t steps = layout.padded_k / 2;
    layout.data.assign(static_cast<std::size_t>(layout.padded_n * layout.padded_k), 0);
    for (std::int64_t row = 0; row < n; ++row) {
      const std::int64_t panel = row / kNR, c = row % kNR;
      std::uint8_t* base = layout.data.data() + panel * steps * 32;
      for (std::int64_t kk = 0; kk < k; ++kk)
        base[(kk / 2) * 32 + w8_offset(c, kk & 1)] = static_cast<std::uint8_t>(codes[row * k + kk]);
    }
    return layout;
  }
  // W4: biased nibbles (w + 8), padding = 8 (weight 0); see the W4 kernels.
  const W4Shape shape = w4_shape(k, group_size);
  layout.padded_k = shape.padded_k();
  const std::int64_t steps = shape.steps();
  layout.data.assign(static_cast<std::size_t>(layout.padded_n / kNR * steps * 32), 0x88);
  for (std::int64_t row = 0; row < n; ++row) {
    const std::int64_t panel = row / kNR, c = row % kNR;
    std::uint8_t* base = layout.data.data() + panel * steps * 32;
    for (std::int64_t kk = 0; kk < k; ++kk) {
      const std::int64_t kp = shape.packed_k(kk);
      std::uint8_t& byte = base[(kp / 4) * 32 + (c % 8) * 4 + kp % 4];
      const auto nib = static_cast<std::uint8_t>((codes[row * k + kk] + 8) & 0x0f);
      byte = c < 8 ? static_cast<std::uint8_t>((byte & 0xf0) | nib) : static_cast<std::uint8_t>((byte & 0x0f) | (nib << 4));
    }
  }
  return layout;
}

// Per-group scales [n, groups] of int4 weights as the W4 kernel's panels read them: [panel][group][16 columns],
// padding columns 0 (prepare_panel would otherwise transpose them for every panel of every call). When every scale
// is exactly a float16 (quantizers that round their steps to float16, as llama.cpp's blocks do), its bits: a decode
// step of int4 weights in groups of 32 then reads 1/8 instead of 1/4 of a byte of scale per weight. Per-channel
// scales, and int8 weights (whose kernel transposes a panel's scales itself), need nothing.
ArrangedScales arrange_weight_scales_avx2(const float* scales, std::int64_t n, std::int64_t columns, int bits) {
  ArrangedScales arranged;
  if (columns <= 1 || bits != 4) return arranged;
  const std::int64_t count = n * columns;
  bool exact_f16 = true;
  for (std::int64_t i = 0; i < count && exact_f16; ++i)
    exact_f16 = _cvtsh_ss(_cvtss_sh(scales[i], _MM_FROUND_TO_NEAREST_INT)) == scales[i];
  const auto size = static_cast<std::size_t>(round_up(n, kNR) * columns);
  if (exact_f16)
    arranged.f16.assign(size, 0);
  else
    arranged.f32.assign(size, 0.0f);
  for (std::int64_t row = 0; row < n; ++row) {
    const std::int64_t base = (row / kNR) * columns * kNR + row % kNR;
    for (std::int64_t g = 0; g < columns; ++g) {
      const float s = scales[row * columns + g];
      if (exact_f16)
        arranged.f16[static_cast<std::size_t>(base + g * kNR)] = _cvtss_sh(s, _MM_FROUND_TO_NEAREST_INT);
      else
        arranged.f32[static_cast<std::size_t>(base + g * kNR)] = s;
    }
  }
  return arranged;
}

void unpack_weights_avx2(const PackedWeights& w, const std::int32_t* rows, std::int64_t count,
                         std::int8_t* codes) {
  const std::int64_t k = w.k();
  const std::uint8_t* data = w.data();
  const W4Shape shape = w4_shape(k, w.group_size());
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int64_t row = rows ? rows[i] : i;
    const std::int64_t panel = row / kNR, c = row % kNR;
    std::int8_t* out = codes + i * k;
    if (w.bits() == 8) {
      const std::int64_t steps = w.padded_k() / 2;
      const std::uint8_t* base = data + panel * steps * 32 + w8_offset(c, 0);
      for (std::int64_t kk = 0; kk < k; ++kk) out[kk] = static_cast<std::int8_t>(base[(kk / 2) * 32 + (kk & 1)]);
    } else {
      const std::uint8_t* base = data + panel * shape.steps() * 32;
      for (std::int64_t kk = 0; kk < k; ++kk) {
        const std::int64_t kp = shape.packed_k(kk);
        const std::uint8_t byte = base[(kp / 4) * 32 + (c % 8) * 4 + kp % 4];
        out[kk] = static_cast<std::int8_t>(((c < 8 ? byte : byte >> 4) & 0x0f) - 8);
      }
    }
  }
}

}  // namespace osengine::detail
