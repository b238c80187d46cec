// RoPE tables and causal attention as Context computes them (see osengine/runtime/attention.hpp).
#include "osengine/runtime/attention.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "float_kernels.hpp"

namespace osengine::runtime {

void rope_inv_freq(float theta, std::int64_t head_dim, float* inv_freq) {
  for (std::int64_t i = 0; i < head_dim / 2; ++i)
    inv_freq[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
}

void rope_tables(const float* inv_freq, std::int64_t half, const std::int32_t* positions, std::int64_t n, float* cos,
                 float* sin) {
  for (std::int64_t r = 0; r < n; ++r) {
    const float pos = static_cast<float>(positions[r]);
    for (std::int64_t i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[i];
      cos[r * half + i] = std::cos(angle);
      sin[r * half + i] = std::sin(angle);
    }
  }
}

void causal_attention(const float* q, const float* k, const float* v, std::int64_t t, std::int64_t s,
                      std::int64_t n_head, std::int64_t n_head_kv, std::int64_t head_dim, float* out) {
  const auto attend = detail::float_kernels().attend;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const std::int64_t group = n_head / n_head_kv, slots = (s + 7) / 8 * 8;
  std::vector<float> keys(static_cast<std::size_t>(slots * head_dim), 0.0f);
  std::vector<float> values(static_cast<std::size_t>(s * head_dim));
  std::vector<float> scores(static_cast<std::size_t>(detail::kAttendRows * slots));
  for (std::int64_t g = 0; g < n_head_kv; ++g) {
    // This head's cache as Context keeps it: keys blocked by 8 positions, values a row per position.
    for (std::int64_t pos = 0; pos < s; ++pos)
      for (std::int64_t i = 0; i < head_dim; ++i) {
        keys[static_cast<std::size_t>(detail::key_offset(pos, i, head_dim))] = k[(pos * n_head_kv + g) * head_dim + i];
        values[static_cast<std::size_t>(pos * head_dim + i)] = v[(pos * n_head_kv + g) * head_dim + i];
      }
    for (std::int64_t h = g * group; h < (g + 1) * group; ++h)
      for (std::int64_t first = 0; first < t; first += detail::kAttendRows) {
        const int rows = static_cast<int>(std::min<std::int64_t>(detail::kAttendRows, t - first));
        const float* qp[detail::kAttendRows];
        float* op[detail::kAttendRows];
        int n_keys[detail::kAttendRows];
        for (int i = 0; i < rows; ++i) {
          qp[i] = q + ((first + i) * n_head + h) * head_dim;
          op[i] = out + ((first + i) * n_head + h) * head_dim;
          n_keys[i] = static_cast<int>(s - t + first + i + 1);
        }
        attend(qp, n_keys, rows, keys.data(), values.data(), head_dim, scale, scores.data(), slots, op);
      }
  }
}

}  // namespace osengine::runtime
