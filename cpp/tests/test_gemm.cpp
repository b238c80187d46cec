// Semantics of the GEMMs and their epilogue (reference backend) against straightforward double-precision math.
#include <cmath>

#include "core/float_math.hpp"
#include "harness.hpp"
#include "test_util.hpp"

using namespace osengine;
using osengine_test::random_codes;
using osengine_test::random_floats;

namespace {

std::vector<std::int32_t> naive_accumulators(const std::vector<std::int8_t>& a, const std::vector<std::int8_t>& w,
                                             std::int64_t m, std::int64_t n, std::int64_t k) {
  std::vector<std::int32_t> out(static_cast<std::size_t>(m * n));
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      std::int64_t acc = 0;
      for (std::int64_t t = 0; t < k; ++t) acc += std::int64_t{a[i * k + t]} * w[j * k + t];
      out[i * n + j] = static_cast<std::int32_t>(acc);
    }
  return out;
}

bool close(double got, double want, double rtol) { return std::fabs(got - want) <= rtol * std::fmax(1.0, std::fabs(want)); }

}  // namespace

TEST(w8a8_accumulators_are_exact_at_the_extremes) {
  const std::int64_t m = 3, n = 5, k = 4099;
  std::vector<std::int8_t> a(m * k, -128), w(n * k, 127);
  for (std::int64_t j = 0; j < k; ++j) w[k + j] = -127;  // row 1 all -127
  auto packed = PackedWeights::pack(view(w.data(), {n, k}), 8, 0, Backend::reference);
  std::vector<std::int32_t> acc(m * n);
  gemm_accumulate(view(a.data(), {m, k}), ActivationFormat::int8, packed, view(acc.data(), {m, n}));
  CHECK(acc == naive_accumulators(a, w, m, n, k));
  CHECK_EQ(acc[0], -128 * 127 * 4099);
}

TEST(w4a8_and_w4a4_accumulators_match_the_unpacked_codes) {
  const std::int64_t m = 4, n = 6, k = 130;
  auto a8 = random_codes(m * k, 11, -128, 127);
  auto a4 = random_codes(m * k, 12, -8, 7);
  auto w4 = random_codes(n * k, 13, -8, 7);
  auto w_packed = osengine_test::pack_nibbles(w4);
  auto a_packed = osengine_test::pack_nibbles(a4);
  auto packed = PackedWeights::pack(TensorView(w_packed.data(), DType::uint8, {n, k / 2}), 4, 0, Backend::reference);
  std::vector<std::int32_t> acc(m * n);
  gemm_accumulate(view(a8.data(), {m, k}), ActivationFormat::int8, packed, view(acc.data(), {m, n}));
  CHECK(acc == naive_accumulators(a8, w4, m, n, k));
  gemm_accumulate(TensorView(a_packed.data(), DType::uint8, {m, k / 2}), ActivationFormat::int4_packed, packed,
                  view(acc.data(), {m, n}));
  CHECK(acc == naive_accumulators(a4, w4, m, n, k));
  std::vector<std::int8_t> unpacked(n * k);
  packed.unpack(view(unpacked.data(), {n, k}));
  CHECK(unpacked == w4);
}

TEST(epilogue_matches_the_formula) {
  const std::int64_t m = 5, n = 7, k = 48;
  auto a = random_codes(m * k, 21, -128, 127);
  auto w = random_codes(n * k, 22, -127, 127);
  auto a_scale = random_floats(m, 23);
  auto w_scale = random_floats(n, 24);
  for (auto& s : a_scale) s = std::fabs(s) + 0.01f;
  for (auto& s : w_scale) s = std::fabs(s) * 0.01f + 1e-4f;
  auto bias = random_floats(n, 25);
  auto residual = random_floats(m * n, 26);
  std::vector<std::int32_t> zp(m);
  for (std::int64_t i = 0; i < m; ++i) zp[i] = static_cast<std::int32_t>(i * 17 % 255) - 128;
  auto packed = PackedWeights::pack(view(w.data(), {n, k}), 8, 0, Backend::reference);
  auto acc = naive_accumulators(a, w, m, n, k);
  for (Activation act : {Activation::none, Activation::relu, Activation::gelu, Activation::gelu_tanh, Activation::silu}) {
    std::vector<float> out(m * n);
    GemmArgs args;
    args.a = view(a.data(), {m, k});
    args.a_scale = view(a_scale.data(), {m});
    args.a_zero_point = view(zp.data(), {m});
    args.w_scale = view(w_scale.data(), {n});
    args.bias = view(bias.data(), {n});
    args.residual = view(residual.data(), {m, n});
    args.activation = act;
    args.out = view(out.data(), {m, n});
    gemm(args, packed);
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        std::int64_t colsum = 0;
        for (std::int64_t t = 0; t < k; ++t) colsum += w[j * k + t];
        double y = double{a_scale[i]} * w_scale[j] * static_cast<double>(acc[i * n + j] - zp[i] * colsum) + bias[j];
        switch (act) {
          case Activation::relu: y = std::fmax(y, 0.0); break;
          case Activation::gelu: y = 0.5 * y * (1.0 + std::erf(y / std::sqrt(2.0))); break;
          case Activation::gelu_tanh:
            y = 0.5 * y * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (y + 0.044715 * y * y * y)));
            break;
          case Activation::silu: y = y / (1.0 + std::exp(-y)); break;
          case Activation::none: break;
        }
        y += residual[i * n + j];
        CHECK(close(out[i * n + j], y, 2e-5));
      }
  }
}

TEST(zero_point_correction_recovers_the_float_product) {
  // Asymmetric activations (a shifted distribution) + the epilogue's zero-point term ~= the float GEMM.
  const std::int64_t m = 4, n = 8, k = 256;
  auto x = random_floats(m * k, 31);
  for (auto& v : x) v += 3.0f;
  auto wf = random_floats(n * k, 32, 0.05f);
  std::vector<std::int8_t> w(n * k);
  std::vector<float> w_scale(n);
  for (std::int64_t j = 0; j < n; ++j) {
    float amax = 0;
    for (std::int64_t t = 0; t < k; ++t) amax = std::fmax(amax, std::fabs(wf[j * k + t]));
    w_scale[j] = amax / 127.0f;
    for (std::int64_t t = 0; t < k; ++t) w[j * k + t] = static_cast<std::int8_t>(std::nearbyint(wf[j * k + t] / w_scale[j]));
  }
  std::vector<std::int8_t> q(m * k);
  std::vector<float> delta(m);
  std::vector<std::int32_t> zp(m);
  quantize_dynamic(view(x.data(), {m, k}), {}, {}, view(q.data(), {m, k}), view(delta.data(), {m}), view(zp.data(), {m}),
                   QuantizeOptions{8, false, 0, Backend::reference});
  auto packed = PackedWeights::pack(view(w.data(), {n, k}), 8, 0, Backend::reference);
  std::vector<float> out(m * n);
  GemmArgs args;
  args.a = view(q.data(), {m, k});
  args.a_scale = view(delta.data(), {m});
  args.a_zero_point = view(zp.data(), {m});
  args.w_scale = view(w_scale.data(), {n});
  args.out = view(out.data(), {m, n});
  gemm(args, packed);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double want = 0;
      for (std::int64_t t = 0; t < k; ++t) want += double{x[i * k + t]} * w_scale[j] * w[j * k + t];
      CHECK(std::fabs(out[i * n + j] - want) < 0.05 * std::fmax(1.0, std::fabs(want)));
    }
}

TEST(per_group_epilogue_sums_groups_in_order) {
  const std::int64_t m = 3, n = 4, k = 128, g = 32, groups = 4;
  auto a = random_codes(m * k, 41, -8, 7);
  auto w = random_codes(n * k, 42, -8, 7);
  auto w_packed = osengine_test::pack_nibbles(w);
  auto packed = PackedWeights::pack(TensorView(w_packed.data(), DType::uint8, {n, k / 2}), 4, g, Backend::reference);
  CHECK_EQ(packed.num_groups(), groups);
  auto a_scale = random_floats(m * groups, 43);
  auto w_scale = random_floats(n * groups, 44);
  for (auto& s : a_scale) s = std::fabs(s) + 0.1f;
  for (auto& s : w_scale) s = std::fabs(s) + 0.1f;
  std::vector<float> out(m * n);
  GemmArgs args;
  args.a = view(a.data(), {m, k});
  args.a_scale = view(a_scale.data(), {m, groups});
  args.w_scale = view(w_scale.data(), {n, groups});
  args.out = view(out.data(), {m, n});
  gemm(args, packed);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      float y = 0.0f;
      for (std::int64_t gi = 0; gi < groups; ++gi) {
        std::int32_t acc = 0;
        for (std::int64_t t = gi * g; t < (gi + 1) * g; ++t) acc += a[i * k + t] * w[j * k + t];
        y = std::fma(static_cast<float>(acc), a_scale[i * groups + gi] * w_scale[j * groups + gi], y);
      }
      CHECK_EQ(out[i * n + j], y);
    }
}

TEST(bfloat16_output_is_the_rounded_float32_output) {
  const std::int64_t m = 3, n = 9, k = 20;
  auto a = random_codes(m * k, 51, -128, 127);
  auto w = random_codes(n * k, 52, -127, 127);
  auto packed = PackedWeights::pack(view(w.data(), {n, k}), 8, 0, Backend::reference);
  float a_scale = 0.02f, w_scale = 0.003f;
  std::vector<float> out32(m * n);
  std::vector<std::uint16_t> out16(m * n);
  GemmArgs args;
  args.a = view(a.data(), {m, k});
  args.a_scale = view(&a_scale, {1});
  args.w_scale = view(&w_scale, {1});
  args.out = view(out32.data(), {m, n});
  gemm(args, packed);
  args.out = TensorView(out16.data(), DType::bfloat16, {m, n});
  gemm(args, packed);
  for (std::int64_t i = 0; i < m * n; ++i) CHECK_EQ(out16[i], detail::float_to_bf16(out32[i]));
}

TEST(activation_approximations_are_accurate) {
  for (float x = -12.0f; x <= 12.0f; x += 0.013f) {
    const double xd = x;
    CHECK(std::fabs(detail::erf_approx(x) - std::erf(xd)) < 5e-7);
    CHECK(std::fabs(detail::gelu_approx(x) - 0.5 * xd * (1 + std::erf(xd / std::sqrt(2.0)))) < 2e-6 * std::fmax(1.0, std::fabs(xd)));
    CHECK(std::fabs(detail::silu_approx(x) - xd / (1 + std::exp(-xd))) < 2e-6 * std::fmax(1.0, std::fabs(xd)));
    CHECK(std::fabs(detail::exp_approx(x) - std::exp(xd)) <= 4e-7 * std::exp(xd));
  }
}

OSENGINE_TEST_MAIN
