// Small helpers shared by the C++ tests: deterministic random data and owning buffers.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "osengine/osengine.hpp"

namespace osengine_test {

inline std::vector<float> random_floats(std::size_t count, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(count);
  for (auto& x : v) x = dist(gen);
  return v;
}

inline std::vector<std::int8_t> random_codes(std::size_t count, std::uint32_t seed, int lo, int hi) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<std::int8_t> v(count);
  for (auto& x : v) x = static_cast<std::int8_t>(dist(gen));
  return v;
}

inline std::vector<std::uint8_t> pack_nibbles(const std::vector<std::int8_t>& codes) {
  std::vector<std::uint8_t> out(codes.size() / 2);
  osengine::pack_int4(osengine::TensorView(const_cast<std::int8_t*>(codes.data()), osengine::DType::int8,
                                           {static_cast<std::int64_t>(codes.size())}),
                      osengine::TensorView(out.data(), osengine::DType::uint8, {static_cast<std::int64_t>(out.size())}));
  return out;
}

}  // namespace osengine_test
