// Semantics of activation quantization (reference backend): rounding, clamping, fused shift/scale, dynamic ranges,
// groups, bf16 input, every bit width.
#include <cmath>

#include "core/float_math.hpp"
#include "harness.hpp"
#include "test_util.hpp"

using namespace osengine;
using osengine_test::random_floats;

namespace {
QuantizeOptions reference_options(int bits, bool symmetric, std::int64_t group_size = 0) {
  return QuantizeOptions{bits, symmetric, group_size, Backend::reference};
}

// A fused prologue (`fused` applied to x [m, x_cols]) gives, on every backend, the codes, scales and zero points of
// the reference quantizing the prologue's result y [m, k] directly.
void check_fused_prologue(const std::vector<float>& x, std::int64_t x_cols, const std::vector<float>& y,
                          std::int64_t m, std::int64_t k, QuantizeOptions fused) {
  std::vector<std::int8_t> want(y.size());
  std::vector<float> d_want(m);
  std::vector<std::int32_t> z_want(m);
  quantize_dynamic(view(y.data(), {m, k}), {}, {}, view(want.data(), {m, k}), view(d_want.data(), {m}),
                   view(z_want.data(), {m}), reference_options(fused.bits, fused.symmetric));
  for (Backend backend : {Backend::reference, Backend::automatic}) {
    std::vector<std::int8_t> got(y.size());
    std::vector<float> d(m);
    std::vector<std::int32_t> z(m);
    fused.backend = backend;
    quantize_dynamic(view(x.data(), {m, x_cols}), {}, {}, view(got.data(), {m, k}), view(d.data(), {m}),
                     view(z.data(), {m}), fused);
    CHECK(got == want);
    CHECK(d == d_want);
    CHECK(z == z_want);
  }
}
}  // namespace

TEST(code_ranges) {
  CHECK_EQ(code_range(8, true).qmin, -127);
  CHECK_EQ(code_range(8, true).qmax, 127);
  CHECK_EQ(code_range(8, false).qmin, -128);
  CHECK_EQ(code_range(4, true).qmin, -7);
  CHECK_EQ(code_range(4, false).qmin, -8);
  CHECK_EQ(code_range(2, false).qmax, 1);
}

TEST(static_rounds_half_to_even_and_clamps) {
  std::vector<float> x = {0.5f, -1.0f, 2.6f, 100.0f, 0.25f, 0.75f, -0.25f, -100.0f};
  std::vector<std::int8_t> q(x.size());
  float delta = 0.5f;
  quantize_static(view(x.data(), {1, 8}), {}, {}, view(&delta, {1}), {}, view(q.data(), {1, 8}),
                  reference_options(8, true));
  const std::vector<std::int8_t> expected = {1, -2, 5, 127, 0, 2, 0, -127};
  for (std::size_t i = 0; i < x.size(); ++i) CHECK_EQ(int{q[i]}, int{expected[i]});
}

TEST(static_asymmetric_zero_point_and_range) {
  std::vector<float> x = {0.0f, 1.0f, -1.0f, 1000.0f, -1000.0f};
  std::vector<std::int8_t> q(x.size());
  float delta = 0.1f;
  std::int32_t zp = -3;
  quantize_static(view(x.data(), {1, 5}), {}, {}, view(&delta, {1}), view(&zp, {1}), view(q.data(), {1, 5}),
                  reference_options(8, false));
  CHECK_EQ(int{q[0]}, -3);
  CHECK_EQ(int{q[1]}, 7);
  CHECK_EQ(int{q[2]}, -13);
  CHECK_EQ(int{q[3]}, 127);
  CHECK_EQ(int{q[4]}, -128);
}

TEST(fused_shift_and_scale_equal_quantizing_the_transformed_input) {
  const std::int64_t m = 5, k = 33;
  auto x = random_floats(m * k, 1, 3.0f);
  auto z = random_floats(k, 2, 2.0f);
  std::vector<float> s(k);
  for (std::int64_t j = 0; j < k; ++j) s[j] = 0.5f + static_cast<float>(j % 7);
  std::vector<float> y(x.size());
  for (std::int64_t i = 0; i < m * k; ++i) y[i] = (x[i] - z[i % k]) / s[i % k];
  std::vector<std::int8_t> q1(x.size()), q2(x.size());
  std::vector<float> d1(m), d2(m);
  std::vector<std::int32_t> z1(m), z2(m);
  const auto options = reference_options(6, false);
  quantize_dynamic(view(x.data(), {m, k}), view(z.data(), {k}), view(s.data(), {k}), view(q1.data(), {m, k}),
                   view(d1.data(), {m}), view(z1.data(), {m}), options);
  quantize_dynamic(view(y.data(), {m, k}), {}, {}, view(q2.data(), {m, k}), view(d2.data(), {m}), view(z2.data(), {m}),
                   options);
  CHECK(q1 == q2);
  CHECK(d1 == d2);
  CHECK(z1 == z2);
}

TEST(fused_rms_norm_equals_quantizing_the_normalized_input_on_every_backend) {
  // The documented order: 8 interleaved fma partial sums, combined pairwise; r = 1 / sqrt(sum / K + eps).
  const std::int64_t m = 4, k = 37;
  const float eps = 1e-5f;
  auto x = random_floats(m * k, 3, 4.0f);
  auto w = random_floats(k, 4, 1.0f);
  std::vector<float> y(x.size());
  for (std::int64_t row = 0; row < m; ++row) {
    float partial[8] = {};
    for (std::int64_t j = 0; j < k; ++j) partial[j % 8] = std::fma(x[row * k + j], x[row * k + j], partial[j % 8]);
    const float sum = ((partial[0] + partial[4]) + (partial[2] + partial[6])) +
                      ((partial[1] + partial[5]) + (partial[3] + partial[7]));
    const float r = 1.0f / std::sqrt(sum / static_cast<float>(k) + eps);
    for (std::int64_t j = 0; j < k; ++j) y[row * k + j] = w[j] * (x[row * k + j] * r);
  }
  QuantizeOptions fused{8, false, 0, Backend::reference};
  fused.rms_norm_weight = view(w.data(), {k});
  fused.rms_norm_eps = eps;
  check_fused_prologue(x, k, y, m, k, fused);
}

TEST(fused_silu_gate_equals_quantizing_the_product_on_every_backend) {
  const std::int64_t m = 3, k = 21;  // x = [gate | up]: [3, 42]
  auto x = random_floats(m * 2 * k, 5, 4.0f);
  std::vector<float> y(static_cast<std::size_t>(m * k));
  for (std::int64_t row = 0; row < m; ++row)
    for (std::int64_t j = 0; j < k; ++j)
      y[row * k + j] = detail::silu_approx(x[row * 2 * k + j]) * x[row * 2 * k + k + j];
  QuantizeOptions fused{8, true, 0, Backend::reference};
  fused.silu_gate = true;
  check_fused_prologue(x, 2 * k, y, m, k, fused);
}

TEST(dynamic_per_token_error_is_within_half_a_step_for_every_bit_width) {
  const std::int64_t m = 7, k = 64;
  auto x = random_floats(m * k, 3, 2.0f);
  for (std::int64_t i = 0; i < k; i += 9) x[i] += 25.0f;  // an outlier channel in row 0
  for (int bits = 2; bits <= 8; ++bits) {
    for (bool symmetric : {true, false}) {
      std::vector<std::int8_t> q(x.size());
      std::vector<float> delta(m);
      std::vector<std::int32_t> zp(m);
      quantize_dynamic(view(x.data(), {m, k}), {}, {}, view(q.data(), {m, k}), view(delta.data(), {m}),
                       view(zp.data(), {m}), reference_options(bits, symmetric));
      const auto range = code_range(bits, symmetric);
      for (std::int64_t r = 0; r < m; ++r) {
        CHECK(delta[r] > 0.0f);
        if (symmetric) CHECK_EQ(zp[r], 0);
        for (std::int64_t c = 0; c < k; ++c) {
          const int code = q[r * k + c];
          CHECK(code >= range.qmin && code <= range.qmax);
          const float back = delta[r] * static_cast<float>(code - zp[r]);
          CHECK(std::fabs(back - x[r * k + c]) <= 0.5001f * delta[r] + 1e-6f);
        }
      }
    }
  }
}

TEST(dynamic_groups_equal_quantizing_each_group_alone) {
  const std::int64_t m = 3, k = 96, g = 32;
  auto x = random_floats(m * k, 4, 1.0f);
  std::vector<std::int8_t> q(x.size());
  std::vector<float> delta(m * 3);
  std::vector<std::int32_t> zp(m * 3);
  quantize_dynamic(view(x.data(), {m, k}), {}, {}, view(q.data(), {m, k}), view(delta.data(), {m, 3}),
                   view(zp.data(), {m, 3}), reference_options(4, false, g));
  for (std::int64_t r = 0; r < m; ++r)
    for (std::int64_t j = 0; j < 3; ++j) {
      std::vector<float> part(x.begin() + r * k + j * g, x.begin() + r * k + (j + 1) * g);
      std::vector<std::int8_t> qp(g);
      float d;
      std::int32_t z;
      quantize_dynamic(view(part.data(), {1, g}), {}, {}, view(qp.data(), {1, g}), view(&d, {1}), view(&z, {1}),
                       reference_options(4, false));
      CHECK_EQ(d, delta[r * 3 + j]);
      CHECK_EQ(z, zp[r * 3 + j]);
      for (std::int64_t i = 0; i < g; ++i) CHECK_EQ(int{qp[i]}, int{q[r * k + j * g + i]});
    }
}

TEST(all_zero_row_gets_unit_step) {
  std::vector<float> x(16, 0.0f);
  std::vector<std::int8_t> q(16, 5);
  float d = 0;
  std::int32_t z = 7;
  quantize_dynamic(view(x.data(), {1, 16}), {}, {}, view(q.data(), {1, 16}), view(&d, {1}), view(&z, {1}),
                   reference_options(8, false));
  CHECK_EQ(d, 1.0f);
  for (auto code : q) CHECK_EQ(int{code}, z);
}

TEST(bfloat16_input_matches_float32_of_the_same_values) {
  const std::int64_t m = 4, k = 40;
  auto x = random_floats(m * k, 5, 4.0f);
  std::vector<std::uint16_t> xb(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    xb[i] = detail::float_to_bf16(x[i]);
    x[i] = detail::bf16_to_float(xb[i]);
  }
  std::vector<std::int8_t> q1(x.size()), q2(x.size());
  std::vector<float> d1(m), d2(m);
  std::vector<std::int32_t> z1(m), z2(m);
  quantize_dynamic(view(x.data(), {m, k}), {}, {}, view(q1.data(), {m, k}), view(d1.data(), {m}), view(z1.data(), {m}),
                   reference_options(8, false));
  quantize_dynamic(TensorView(xb.data(), DType::bfloat16, {m, k}), {}, {}, view(q2.data(), {m, k}),
                   view(d2.data(), {m}), view(z2.data(), {m}), reference_options(8, false));
  CHECK(q1 == q2);
  CHECK(d1 == d2);
}

OSENGINE_TEST_MAIN
