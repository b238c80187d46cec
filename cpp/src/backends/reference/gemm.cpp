// Scalar reference GEMM + epilogue: the oracle. Weights are kept as int8 codes [N, K] (8-bit) or as the public
// int4 format [N, K/2] (4-bit), read element by element.
#include <cmath>
#include <cstring>

#include "backends/epilogue.hpp"
#include "backends/reference/reference.hpp"

namespace osengine::detail {

namespace {

inline std::int8_t int4_at(const std::uint8_t* packed_row, std::int64_t k) {
  const std::uint8_t byte = packed_row[k >> 1];
  const int nibble = (k & 1) ? (byte >> 4) : (byte & 0x0f);
  return static_cast<std::int8_t>(nibble >= 8 ? nibble - 16 : nibble);
}

inline std::int8_t weight_at(const PackedWeights& w, std::int64_t n, std::int64_t k) {
  if (w.bits() == 8) return static_cast<std::int8_t>(w.data()[n * w.k() + k]);
  return int4_at(w.data() + n * (w.k() / 2), k);
}

inline std::int8_t activation_at(const GemmProblem& p, std::int64_t m, std::int64_t k) {
  if (p.a_format == ActivationFormat::int8) return p.a[m * p.k + k];
  return int4_at(reinterpret_cast<const std::uint8_t*>(p.a) + m * (p.k / 2), k);
}

}  // namespace

WeightLayout pack_weights_reference(const std::int8_t* codes, std::int64_t n, std::int64_t k, int bits,
                                    std::int64_t /*group_size: the layout has no groups*/) {
  WeightLayout layout;
  layout.padded_n = n;
  layout.padded_k = k;
  if (bits == 8) {
    layout.data.assign(reinterpret_cast<const std::uint8_t*>(codes), reinterpret_cast<const std::uint8_t*>(codes) + n * k);
  } else {
    layout.data.assign(static_cast<std::size_t>(n * k / 2), 0);
    for (std::int64_t i = 0; i < n * k; i += 2) {
      const auto lo = static_cast<std::uint8_t>(codes[i] & 0x0f);
      const auto hi = static_cast<std::uint8_t>(codes[i + 1] & 0x0f);
      layout.data[static_cast<std::size_t>(i / 2)] = static_cast<std::uint8_t>(lo | (hi << 4));
    }
  }
  return layout;
}

void unpack_weights_reference(const PackedWeights& w, const std::int32_t* rows, std::int64_t count,
                              std::int8_t* codes) {
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int64_t n = rows ? rows[i] : i;
    for (std::int64_t k = 0; k < w.k(); ++k) codes[i * w.k() + k] = weight_at(w, n, k);
  }
}

void gemm_reference(const GemmProblem& p) {
  const PackedWeights& w = *p.weights;
  const std::int64_t group = w.group_size() > 0 ? w.group_size() : p.k;
  const std::int64_t groups = p.k / group;
  const std::int32_t* colsum = w.column_sums().data();  // [groups, n]
  for (std::int64_t m = 0; m < p.m; ++m) {
    for (std::int64_t n = 0; n < p.n; ++n) {
      if (p.out_accumulators) {
        std::int32_t acc = 0;
        for (std::int64_t k = 0; k < p.k; ++k) acc += std::int32_t{activation_at(p, m, k)} * std::int32_t{weight_at(w, n, k)};
        p.out_accumulators[m * p.n + n] = acc;
        continue;
      }
      // y = bias; then for each group: y = fma(float(acc_g - zp * colsum_g), a_scale * w_scale, y); then the
      // activation, the residual and the store (backends/epilogue.hpp)
      float y = epilogue_start(p, n);
      for (std::int64_t g = 0; g < groups; ++g) {
        std::int32_t acc = 0;
        for (std::int64_t k = g * group; k < (g + 1) * group; ++k)
          acc += std::int32_t{activation_at(p, m, k)} * std::int32_t{weight_at(w, n, k)};
        y = epilogue_group_at(p, y, acc, colsum[g * p.n + n], m, n, g);
      }
      epilogue_store(p, y, m * p.n + n);
    }
  }
}

}  // namespace osengine::detail
