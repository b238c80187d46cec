// Example 01: the OS+ linear layer on the engine, from a C++ application with no Python or libtorch.
//
//   1. quantize a float weight matrix W [N, K] per output channel (symmetric int8) and pack it once;
//   2. fold an OS+ channel shift z into the bias (b' = b + W z) and quantize activations with the fused shift,
//      per token, asymmetric;
//   3. run the W8A8 GEMM whose epilogue applies scales, the zero-point correction and the bias;
//   4. compare with the float result X W^T + b.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "osengine/osengine.hpp"

int main() {
  const std::int64_t m = 8, n = 64, k = 256;
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);

  std::vector<float> x(m * k), w(n * k), bias(n), shift(k);
  for (auto& v : x) v = normal(gen);
  for (std::int64_t t = 0; t < m; ++t) x[t * k + 5] = 40.0f + 5.0f * normal(gen);  // an asymmetric outlier channel
  for (auto& v : w) v = 0.05f * normal(gen);
  for (auto& v : bias) v = normal(gen);
  shift[5] = 40.0f;  // OS+ shift for the outlier channel

  // 1. weights: per-channel symmetric int8
  std::vector<std::int8_t> w_codes(n * k);
  std::vector<float> w_scale(n);
  for (std::int64_t j = 0; j < n; ++j) {
    float amax = 0.0f;
    for (std::int64_t t = 0; t < k; ++t) amax = std::max(amax, std::fabs(w[j * k + t]));
    w_scale[j] = amax / 127.0f;
    for (std::int64_t t = 0; t < k; ++t)
      w_codes[j * k + t] = static_cast<std::int8_t>(std::nearbyint(w[j * k + t] / w_scale[j]));
  }
  const auto packed = osengine::PackedWeights::pack(osengine::view(w_codes.data(), {n, k}), 8);

  // 2. fold the shift into the bias (computed with the float weights), quantize (x - z) per token
  std::vector<float> folded_bias(bias);
  for (std::int64_t j = 0; j < n; ++j)
    for (std::int64_t t = 0; t < k; ++t) folded_bias[j] += w[j * k + t] * shift[t];
  std::vector<std::int8_t> a_codes(m * k);
  std::vector<float> a_scale(m);
  std::vector<std::int32_t> a_zero_point(m);
  osengine::quantize_dynamic(osengine::view(x.data(), {m, k}), osengine::view(shift.data(), {k}), {},
                             osengine::view(a_codes.data(), {m, k}), osengine::view(a_scale.data(), {m}),
                             osengine::view(a_zero_point.data(), {m}), osengine::QuantizeOptions{8, false});

  // 3. GEMM + fused epilogue
  std::vector<float> y(m * n);
  osengine::GemmArgs args;
  args.a = osengine::view(a_codes.data(), {m, k});
  args.a_scale = osengine::view(a_scale.data(), {m});
  args.a_zero_point = osengine::view(a_zero_point.data(), {m});
  args.w_scale = osengine::view(w_scale.data(), {n});
  args.bias = osengine::view(folded_bias.data(), {n});
  args.out = osengine::view(y.data(), {m, n});
  osengine::gemm(args, packed);

  // 4. against the float layer
  double max_error = 0.0, max_value = 0.0;
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double want = bias[j];
      for (std::int64_t t = 0; t < k; ++t) want += double{x[i * k + t]} * w[j * k + t];
      max_error = std::max(max_error, std::fabs(want - y[i * n + j]));
      max_value = std::max(max_value, std::fabs(want));
    }
  std::printf("osengine %s, backend %s: W8A8 linear [%lld x %lld] x [%lld x %lld]^T, max |error| %.4f (max |y| %.2f)\n",
              OSENGINE_VERSION_STRING, osengine::backend_name(packed.backend()), static_cast<long long>(m),
              static_cast<long long>(k), static_cast<long long>(n), static_cast<long long>(k), max_error, max_value);
  const bool ok = max_error < 0.02 * max_value;
  std::printf("%s\n", ok ? "OK" : "ERROR: quantized result too far from the float result");
  return ok ? 0 : 1;
}
