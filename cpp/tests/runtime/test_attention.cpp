// The runtime's RoPE tables and causal attention as standalone functions (cpp/runtime/attention.cpp), which the
// Python models use to compute what Context computes: prefill in one call equals each query computed alone with
// only its prefix (a decode step), bit for bit; grouped-query heads read their key/value head; the values against
// the direct formula; the RoPE tables against cos / sin of position * inv_freq in float64.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "harness.hpp"
#include "osengine/runtime/attention.hpp"

namespace rt = osengine::runtime;

namespace {

std::vector<float> normal(std::size_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

}  // namespace

TEST(prefill_equals_each_query_with_its_prefix_alone) {
  std::mt19937 rng(5);
  for (std::int64_t hd : {8, 64})
    for (auto [n_head, n_kv] : {std::pair<std::int64_t, std::int64_t>{4, 4}, {6, 2}, {3, 1}})
      for (std::int64_t s : {1, 5, 17}) {
        const std::vector<float> q = normal(static_cast<std::size_t>(s * n_head * hd), rng);
        const std::vector<float> k = normal(static_cast<std::size_t>(s * n_kv * hd), rng);
        const std::vector<float> v = normal(static_cast<std::size_t>(s * n_kv * hd), rng);
        std::vector<float> all(q.size());
        rt::causal_attention(q.data(), k.data(), v.data(), s, s, n_head, n_kv, hd, all.data());
        for (std::int64_t i = 0; i < s; ++i) {
          // query i alone, over keys 0 .. i (one decode step at position i)
          std::vector<float> one(static_cast<std::size_t>(n_head * hd));
          rt::causal_attention(q.data() + i * n_head * hd, k.data(), v.data(), 1, i + 1, n_head, n_kv, hd, one.data());
          CHECK(std::memcmp(one.data(), all.data() + i * n_head * hd, one.size() * sizeof(float)) == 0);
        }
        // query head h of the last row against the direct formula over its key/value head h / (n_head / n_kv)
        for (std::int64_t h = 0; h < n_head; ++h) {
          const std::int64_t g = h / (n_head / n_kv), last = s - 1;
          std::vector<double> p(static_cast<std::size_t>(s));
          double top = -INFINITY, total = 0.0;
          for (std::int64_t j = 0; j < s; ++j) {
            double dot = 0.0;
            for (std::int64_t i = 0; i < hd; ++i)
              dot += double(q[static_cast<std::size_t>((last * n_head + h) * hd + i)]) * k[static_cast<std::size_t>((j * n_kv + g) * hd + i)];
            p[static_cast<std::size_t>(j)] = dot / std::sqrt(double(hd));
            top = std::max(top, p[static_cast<std::size_t>(j)]);
          }
          for (double& x : p) total += (x = std::exp(x - top));
          for (std::int64_t i = 0; i < hd; ++i) {
            double want = 0.0;
            for (std::int64_t j = 0; j < s; ++j)
              want += p[static_cast<std::size_t>(j)] / total * v[static_cast<std::size_t>((j * n_kv + g) * hd + i)];
            CHECK(std::abs(all[static_cast<std::size_t>((last * n_head + h) * hd + i)] - want) <= 1e-5 * (1.0 + std::abs(want)));
          }
        }
      }
}

TEST(rope_tables_are_cos_and_sin_of_position_times_inverse_frequency) {
  for (std::int64_t hd : {8, 64, 128}) {
    std::vector<float> inv(static_cast<std::size_t>(hd / 2));
    rt::rope_inv_freq(10000.0f, hd, inv.data());
    const std::vector<std::int32_t> positions = {0, 1, 7, 511, 4095};
    std::vector<float> c(positions.size() * inv.size()), s(c.size());
    rt::rope_tables(inv.data(), hd / 2, positions.data(), static_cast<std::int64_t>(positions.size()), c.data(), s.data());
    for (std::size_t i = 0; i < inv.size(); ++i) {
      CHECK(std::abs(inv[i] - std::pow(10000.0, -2.0 * double(i) / double(hd))) <= 1e-6 * inv[i]);
      for (std::size_t r = 0; r < positions.size(); ++r) {
        const double angle = double(float(positions[r]) * inv[i]);  // the product is rounded to float first
        CHECK(std::abs(c[r * inv.size() + i] - std::cos(angle)) <= 1e-6);
        CHECK(std::abs(s[r * inv.size() + i] - std::sin(angle)) <= 1e-6);
      }
    }
  }
}

OSENGINE_TEST_MAIN
