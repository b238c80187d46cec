// Semantics of activation quantization (reference backend): rounding, clamping, fused shift/scale, dynamic ranges,
// groups, bf16 input, every bit width; the online Hadamard rotation (rotate) against a float64 product.
#include <cmath>
#include <array>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/float_math.hpp"
#include "core/hadamard.hpp"
#include "backends/kernels.hpp"  // rms_norm_factor
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

// ---------------------------------------------------------------- the online Hadamard rotation (rotate)

namespace {
// Every base order of the construction (1 and the Paley orders <= 256), from hadamard_base_matrix.
std::vector<std::int64_t> base_orders() {
  std::vector<std::int64_t> orders;
  for (std::int64_t m = 1; m <= detail::kMaxHadamardBaseOrder; ++m) {
    try {
      detail::hadamard_base_matrix(m);
      orders.push_back(m);
    } catch (const std::invalid_argument&) {
    }
  }
  return orders;
}

// Sylvester's H_p entry: (-1)^popcount(i & j).
int sylvester_entry(std::int64_t i, std::int64_t j) {
  int bits = 0;
  for (std::int64_t v = i & j; v; v &= v - 1) ++bits;
  return bits % 2 ? -1 : 1;
}
}  // namespace

TEST(hadamard_base_matrices_are_hadamard) {
  // H_m H_m^T = m I for every base order, and the orders are those quant/hadamard.py constructs: Paley I for q + 1
  // (q prime, 3 mod 4), Paley II for 2 (q + 1) (q prime, 1 mod 4), up to 256.
  const auto orders = base_orders();
  CHECK_EQ(orders.size(), std::size_t{38});  // 1 and the 37 Paley orders <= 256
  for (std::int64_t m : {4, 12, 20, 28, 36, 44, 60, 76, 108, 172, 252}) {
    bool found = false;
    for (auto o : orders) found = found || o == m;
    if (m != 172) CHECK(found);
    else CHECK(!found);  // 172 = 4 * 43: a Hadamard order, but neither Paley construction's
  }
  for (std::int64_t m : orders) {
    const auto h = detail::hadamard_base_matrix(m);
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < m; ++j) {
        long dot = 0;
        for (std::int64_t c = 0; c < m; ++c)
          dot += h[static_cast<std::size_t>(i * m + c)] * h[static_cast<std::size_t>(j * m + c)];
        if (dot != (i == j ? m : 0)) {
          std::ostringstream msg;
          msg << "H_" << m << " rows " << i << ", " << j << ": dot " << dot;
          throw osengine_test::Failure(msg.str());
        }
      }
  }
}

TEST(hadamard_orders_and_their_decomposition) {
  std::int64_t m = 0, p = 0;
  const std::vector<std::array<std::int64_t, 3>> expected = {  // n, m, 2^k (the largest 2^k)
      {1, 1, 1},     {2, 1, 2},      {12, 12, 1},     {24, 12, 2},   {28, 28, 1},       {36, 36, 1},
      {384, 12, 32}, {576, 36, 16},  {1536, 12, 128}, {4096, 1, 4096}, {14336, 28, 512}, {896, 28, 32},
      {4864, 76, 64}, {5632, 44, 128}};
  for (const auto& e : expected) {
    CHECK(detail::hadamard_decomposition(e[0], m, p));
    CHECK_EQ(m, e[1]);
    CHECK_EQ(p, e[2]);
  }
  for (std::int64_t n : {0, 3, 5, 6, 10, 172, 11008})
    CHECK(!detail::hadamard_decomposition(n, m, p));
  CHECK(is_hadamard_order(1536) && !is_hadamard_order(11008));
}

TEST(rotation_equals_the_float64_product_with_the_normalized_hadamard_matrix) {
  // y = x H_n / sqrt(n), H_n = kron(H_m, Sylvester_p), computed densely in float64; the engine's fp32 transform is
  // within a few ulps of sum |x| per output (log2(p) + m roundings at most along each output's sum).
  for (std::int64_t n : {1, 2, 4, 12, 16, 24, 28, 36, 44, 72, 576, 1536, 4096}) {
    std::int64_t m = 0, p = 0;
    CHECK(detail::hadamard_decomposition(n, m, p));
    const auto h = detail::hadamard_base_matrix(m);
    const std::int64_t rows = 3;
    auto x = random_floats(static_cast<std::size_t>(rows * n), static_cast<std::uint32_t>(n), 2.0f);
    std::vector<float> y(x.size());
    hadamard_transform(view(x.data(), {rows, n}), view(y.data(), {rows, n}));
    int log2p = 0;
    while ((std::int64_t{1} << log2p) < p) ++log2p;
    for (std::int64_t r = 0; r < rows; ++r) {
      double l1 = 0;
      for (std::int64_t i = 0; i < n; ++i) l1 += std::fabs(x[static_cast<std::size_t>(r * n + i)]);
      const double tolerance =
          static_cast<double>(log2p + m + 1) * std::ldexp(1.0, -23) * l1 / std::sqrt(static_cast<double>(n));
      for (std::int64_t j = 0; j < n; ++j) {
        double want = 0;
        for (std::int64_t i = 0; i < n; ++i) {
          const int sign = h[static_cast<std::size_t>((i / p) * m + j / p)] * sylvester_entry(i % p, j % p);
          want += sign * static_cast<double>(x[static_cast<std::size_t>(r * n + i)]);
        }
        want /= std::sqrt(static_cast<double>(n));
        const double got = y[static_cast<std::size_t>(r * n + j)];
        if (!(std::fabs(got - want) <= tolerance)) {
          std::ostringstream msg;
          msg << "n=" << n << " row " << r << " column " << j << ": " << got << " vs float64 " << want;
          throw osengine_test::Failure(msg.str());
        }
      }
    }
    // in place (out = x) gives the same floats
    std::vector<float> in_place = x;
    hadamard_transform(view(in_place.data(), {rows, n}), view(in_place.data(), {rows, n}));
    CHECK(in_place == y);
  }
}

TEST(rotated_quantization_equals_quantizing_the_rotated_row) {
  // rotate = quantize(hadamard_transform(prologue(x))), shift and scale after the rotation, groups over the rotated
  // row; static and dynamic, every bit width, with the SiLU gate and the RMSNorm prologues.
  const std::int64_t rows = 5;
  std::uint32_t seed = 70;
  for (std::int64_t k : {12, 64, 72, 576}) {
    for (int prologue = 0; prologue < 3; ++prologue) {  // none, silu_gate, rms_norm
      const std::int64_t x_cols = prologue == 1 ? 2 * k : k;
      auto x = random_floats(static_cast<std::size_t>(rows * x_cols), seed++, 3.0f);
      auto w = random_floats(static_cast<std::size_t>(k), seed++, 1.0f);
      auto shift = random_floats(static_cast<std::size_t>(k), seed++, 0.5f);
      std::vector<float> smooth(static_cast<std::size_t>(k));
      for (std::int64_t j = 0; j < k; ++j)
        smooth[static_cast<std::size_t>(j)] = 0.5f + static_cast<float>(j % 5) * 0.25f;
      // the prologue's output, as the reference kernel computes it, then the rotation, then the shift and scale
      std::vector<float> y(static_cast<std::size_t>(rows * k));
      for (std::int64_t r = 0; r < rows; ++r) {
        float* yr = y.data() + r * k;
        const float* xr = x.data() + r * x_cols;
        for (std::int64_t j = 0; j < k; ++j) yr[j] = prologue == 1 ? detail::silu_approx(xr[j]) * xr[k + j] : xr[j];
        if (prologue == 2) {
          const float f = detail::rms_norm_factor(yr, k, 1e-5f);
          for (std::int64_t j = 0; j < k; ++j) yr[j] = w[static_cast<std::size_t>(j)] * (yr[j] * f);
        }
      }
      hadamard_transform(view(y.data(), {rows, k}), view(y.data(), {rows, k}));
      for (std::size_t i = 0; i < y.size(); ++i)
        y[i] = (y[i] - shift[i % static_cast<std::size_t>(k)]) / smooth[i % static_cast<std::size_t>(k)];
      for (int bits : {3, 8})
        for (bool symmetric : {true, false})
          for (std::int64_t group : {std::int64_t{0}, k / 2}) {
            const std::int64_t groups = group ? k / group : 1;
            QuantizeOptions fused{bits, symmetric, group, Backend::reference};
            fused.rotate = true;
            fused.silu_gate = prologue == 1;
            if (prologue == 2) {
              fused.rms_norm_weight = view(w.data(), {k});
              fused.rms_norm_eps = 1e-5f;
            }
            const QuantizeOptions plain{bits, symmetric, group, Backend::reference};
            const std::vector<std::int64_t> pshape =
                groups > 1 ? std::vector<std::int64_t>{rows, groups} : std::vector<std::int64_t>{rows};
            std::vector<std::int8_t> q1(y.size()), q2(y.size());
            std::vector<float> d1(static_cast<std::size_t>(rows * groups)), d2(d1.size());
            std::vector<std::int32_t> z1(d1.size()), z2(d1.size());
            quantize_dynamic(view(x.data(), {rows, x_cols}), view(shift.data(), {k}), view(smooth.data(), {k}),
                             view(q1.data(), {rows, k}), view(d1.data(), pshape), view(z1.data(), pshape), fused);
            quantize_dynamic(view(y.data(), {rows, k}), {}, {}, view(q2.data(), {rows, k}), view(d2.data(), pshape),
                             view(z2.data(), pshape), plain);
            CHECK(q1 == q2);
            CHECK(d1 == d2);
            CHECK(z1 == z2);
            // static: the same steps given as calibrated parameters
            std::vector<float> delta(d1.begin(), d1.begin() + groups);
            std::vector<std::int32_t> zp(z1.begin(), z1.begin() + groups);
            quantize_static(view(x.data(), {rows, x_cols}), view(shift.data(), {k}), view(smooth.data(), {k}),
                            view(delta.data(), {groups}), view(zp.data(), {groups}), view(q1.data(), {rows, k}), fused);
            quantize_static(view(y.data(), {rows, k}), {}, {}, view(delta.data(), {groups}), view(zp.data(), {groups}),
                            view(q2.data(), {rows, k}), plain);
            CHECK(q1 == q2);
          }
    }
  }
}

TEST(rotation_errors_name_the_argument) {
  std::vector<float> x(2 * 2 * 11008, 1.0f);
  std::vector<std::int8_t> q(2 * 11008);
  std::vector<float> d(2);
  std::vector<std::int32_t> z(2);
  QuantizeOptions options;
  options.rotate = true;
  for (std::int64_t k : {3, 6, 11008}) {
    std::ostringstream fragment;
    fragment << "argument 'rotate': no Hadamard matrix of order K = " << k;
    CHECK_THROWS(quantize_dynamic(view(x.data(), {2, k}), {}, {}, view(q.data(), {2, k}), view(d.data(), {2}),
                                  view(z.data(), {2}), options),
                 ArgumentError, fragment.str());
    CHECK_THROWS(quantize_dynamic(view(x.data(), {2, k}), {}, {}, view(q.data(), {2, k}), view(d.data(), {2}),
                                  view(z.data(), {2}), options),
                 ArgumentError, "supported orders are m * 2^k with m = 1 or a Paley order <= 256 (12, 20, 24, 28");
    std::vector<float> out(static_cast<std::size_t>(2 * k));
    CHECK_THROWS(hadamard_transform(view(x.data(), {2, k}), view(out.data(), {2, k})), ArgumentError,
                 "hadamard_transform: argument 'x': no Hadamard matrix of order K = " + std::to_string(k));
  }
  // silu_gate: K is half the columns of x
  options.silu_gate = true;
  CHECK_THROWS(quantize_dynamic(view(x.data(), {2, 2 * 11008}), {}, {}, view(q.data(), {2, 11008}), view(d.data(), {2}),
                                view(z.data(), {2}), options),
               ArgumentError, "K = 11008 (half the columns of x: silu_gate)");
  // finite x whose rotated sums overflow float32: the error names the rotation
  options.silu_gate = false;
  std::vector<float> big(2 * 16, 3e38f);
  CHECK_THROWS(quantize_dynamic(view(big.data(), {2, 16}), {}, {}, view(q.data(), {2, 16}), view(d.data(), {2}),
                                view(z.data(), {2}), options),
               ArgumentError, "argument 'rotate': the Hadamard rotation (rotate) of row 0 overflows float32");
  std::vector<float> out(16);
  CHECK_THROWS(hadamard_transform(view(big.data(), {2, 16}), view(out.data(), {1, 16})), ArgumentError,
               "argument 'out': must have the shape of x [2, 16]");
}

OSENGINE_TEST_MAIN
