// Bad input gets an exception naming the op and the argument, never a crash or garbage.
#include <cmath>
#include <limits>
#include <thread>

#include "harness.hpp"
#include "test_util.hpp"

using namespace osengine;

namespace {
struct Fixture {
  std::int64_t m = 2, n = 3, k = 8;
  std::vector<float> x = std::vector<float>(16, 1.0f);
  std::vector<std::int8_t> codes = std::vector<std::int8_t>(16, 1);
  std::vector<std::int8_t> w = std::vector<std::int8_t>(24, 1);
  std::vector<float> a_scale = {0.1f, 0.2f}, w_scale = {0.1f, 0.1f, 0.1f};
  std::vector<float> out = std::vector<float>(6);
  PackedWeights packed = PackedWeights::pack(view(w.data(), {3, 8}), 8, 0, Backend::reference);
  GemmArgs args() {
    GemmArgs g;
    g.a = view(codes.data(), {m, k});
    g.a_scale = view(a_scale.data(), {m});
    g.w_scale = view(w_scale.data(), {n});
    g.out = view(out.data(), {m, n});
    return g;
  }
};
const QuantizeOptions kDefault{8, false, 0, Backend::reference};
}  // namespace

TEST(quantize_rejects_bad_bits_groups_dtypes_and_shapes) {
  Fixture f;
  std::vector<float> d(2);
  std::vector<std::int32_t> z(2);
  auto run = [&](TensorView x, TensorView out, QuantizeOptions o) {
    quantize_dynamic(x, {}, {}, out, view(d.data(), {2}), view(z.data(), {2}), o);
  };
  CHECK_THROWS(run(view(f.x.data(), {2, 8}), view(f.codes.data(), {2, 8}), QuantizeOptions{9, false, 0, Backend::reference}),
               ArgumentError, "'bits': must be in 2..8");
  CHECK_THROWS(run(view(f.x.data(), {2, 8}), view(f.codes.data(), {2, 8}), QuantizeOptions{8, false, 3, Backend::reference}),
               ArgumentError, "'group_size': must divide K = 8");
  CHECK_THROWS(run(TensorView(f.codes.data(), DType::int8, {2, 8}), view(f.codes.data(), {2, 8}), kDefault), DTypeError,
               "'x': expected dtype float32 or bfloat16, got int8");
  CHECK_THROWS(run(TensorView(f.x.data(), DType::float32, {2, 4}, {8, 2}), view(f.codes.data(), {2, 4}), kDefault),
               DTypeError, "'x': must be contiguous");
  CHECK_THROWS(run(view(f.x.data(), {0, 8}), view(f.codes.data(), {0, 8}), kDefault), ArgumentError, "'x': is empty");
  CHECK_THROWS(run(view(f.x.data(), {2, 8}), view(f.codes.data(), {2, 7}), kDefault), ArgumentError, "'out_codes'");
  CHECK_THROWS(run(view(f.x.data(), {16}), view(f.codes.data(), {2, 8}), kDefault), ArgumentError,
               "'x': expected 2 dimensions");
}

TEST(quantize_rejects_non_finite_activations_and_bad_static_parameters) {
  Fixture f;
  f.x[11] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> d(2);
  std::vector<std::int32_t> z(2);
  CHECK_THROWS(quantize_dynamic(view(f.x.data(), {2, 8}), {}, {}, view(f.codes.data(), {2, 8}), view(d.data(), {2}),
                                view(z.data(), {2}), kDefault),
               ArgumentError, "'x': contains a non-finite value (nan) at row 1, column 3");
  f.x[11] = 1.0f;
  float delta = 0.0f;
  CHECK_THROWS(quantize_static(view(f.x.data(), {2, 8}), {}, {}, view(&delta, {1}), {}, view(f.codes.data(), {2, 8}),
                               kDefault),
               ArgumentError, "'delta': must be positive and finite");
  delta = 0.5f;
  std::int32_t zp = 300;
  CHECK_THROWS(quantize_static(view(f.x.data(), {2, 8}), {}, {}, view(&delta, {1}), view(&zp, {1}),
                               view(f.codes.data(), {2, 8}), kDefault),
               ArgumentError, "'zero_point': values must lie in [-128, 127]");
  std::vector<float> s(8, 1.0f);
  s[2] = -1.0f;
  CHECK_THROWS(quantize_static(view(f.x.data(), {2, 8}), {}, view(s.data(), {8}), view(&delta, {1}), {},
                               view(f.codes.data(), {2, 8}), kDefault),
               ArgumentError, "'smooth_scale': must be positive and finite; found -1 at flat index 2");
  CHECK_THROWS(quantize_static(view(f.x.data(), {2, 8}), view(s.data(), {7}), {}, view(&delta, {1}), {},
                               view(f.codes.data(), {2, 8}), kDefault),
               ArgumentError, "'shift': dimension 0 must be 8");
}

TEST(pack_weights_rejects_bad_codes_and_groups) {
  std::vector<std::int8_t> w(24, 1);
  w[5] = -128;
  CHECK_THROWS(PackedWeights::pack(view(w.data(), {3, 8}), 8, 0, Backend::reference), ArgumentError,
               "'weights': int8 weight codes must lie in [-127, 127]");
  w[5] = 0;
  CHECK_THROWS(PackedWeights::pack(view(w.data(), {3, 8}), 5, 0, Backend::reference), ArgumentError,
               "'bits': must be 8 or 4");
  CHECK_THROWS(PackedWeights::pack(view(w.data(), {3, 8}), 8, 3, Backend::reference), ArgumentError,
               "'group_size': must divide K = 8");
  const PackedWeights ok = PackedWeights::pack(view(w.data(), {3, 8}), 8, 0, Backend::reference);
  std::vector<std::int32_t> rows = {2, 3};
  std::vector<std::int8_t> got(16);
  CHECK_THROWS(ok.unpack_rows(view(rows.data(), {2}), view(got.data(), {2, 8})), ArgumentError,
               "'rows': must lie in [0, 3); found 3 at index 1");
  CHECK_THROWS(ok.unpack_rows(view(rows.data(), {1}), view(got.data(), {2, 8})), ArgumentError,
               "'out': must have shape [1, 8], got [2, 8]");
  rows[1] = 0;
  w[2 * 8 + 1] = 7;
  const PackedWeights ref = PackedWeights::pack(view(w.data(), {3, 8}), 8, 0, Backend::reference);
  ref.unpack_rows(view(rows.data(), {2}), view(got.data(), {2, 8}));
  CHECK(std::vector<std::int8_t>(got.begin(), got.begin() + 8) == std::vector<std::int8_t>(w.begin() + 16, w.end()));
  CHECK(std::vector<std::int8_t>(got.begin() + 8, got.end()) == std::vector<std::int8_t>(w.begin(), w.begin() + 8));
  std::vector<float> wf(24);
  CHECK_THROWS(PackedWeights::pack(view(wf.data(), {3, 8}), 8, 0, Backend::reference), DTypeError,
               "'weights': expected dtype int8");
  std::vector<std::int8_t> odd(9, 1);
  std::vector<std::uint8_t> packed(4);
  CHECK_THROWS(pack_int4(view(odd.data(), {9}), view(packed.data(), {4})), ArgumentError, "last dimension must be even");
  odd[0] = 9;
  CHECK_THROWS(pack_int4(view(odd.data(), {8}), view(packed.data(), {4})), ArgumentError, "int4 codes must lie in [-8, 7]");
}

TEST(gemm_rejects_mismatched_shapes_and_bad_scales) {
  Fixture f;
  auto args = f.args();
  args.a = view(f.codes.data(), {4, 4});
  CHECK_THROWS(gemm(args, f.packed), ArgumentError, "'a': K mismatch: a has K = 4 but the weights have K = 8");
  args = f.args();
  f.a_scale[1] = std::numeric_limits<float>::infinity();
  CHECK_THROWS(gemm(args, f.packed), ArgumentError, "'a_scale': must be positive and finite");
  f.a_scale[1] = 0.2f;
  args.w_scale = view(f.w_scale.data(), {2});
  CHECK_THROWS(gemm(args, f.packed), ArgumentError, "'w_scale': must hold one value, one per output channel");
  args = f.args();
  args.out = view(f.out.data(), {3, 2});
  CHECK_THROWS(gemm(args, f.packed), ArgumentError, "'out': must have shape [M, N] = [2, 3]");
  args = f.args();
  std::vector<float> bias = {1.0f, std::nanf(""), 0.0f};
  args.bias = view(bias.data(), {3});
  CHECK_THROWS(gemm(args, f.packed), ArgumentError, "'bias': must be finite");
  args = f.args();
  std::vector<std::int32_t> zp = {0, 500};
  args.a_zero_point = view(zp.data(), {2});
  CHECK_THROWS(gemm(args, f.packed), ArgumentError, "'a_zero_point': values must lie in [-128, 127]");
  args = f.args();
  args.a_format = ActivationFormat::int4_packed;
  CHECK_THROWS(gemm(args, f.packed), ArgumentError, "'a': packed int4 activations (W4A4) need int4 weights");
  args = f.args();
  std::vector<float> group_scale(6, 1.0f);
  args.w_scale = view(group_scale.data(), {3, 2});
  CHECK_THROWS(gemm(args, f.packed), ArgumentError, "per-group scales need weights packed with that group_size");
  args = f.args();
  CHECK_THROWS(gemm(args, PackedWeights()), ArgumentError, "'weights': is empty");
}

TEST(weights_that_carry_their_scales) {
  Fixture f;
  std::vector<float> bad = {0.1f, 0.0f, 0.1f};
  CHECK_THROWS(PackedWeights::pack(view(f.w.data(), {3, 8}), 8, 0, Backend::reference, view(bad.data(), {3})),
               ArgumentError, "'weight_scale': must be positive and finite; found 0 at flat index 1");
  bad[1] = std::nanf("");
  CHECK_THROWS(PackedWeights::pack(view(f.w.data(), {3, 8}), 8, 0, Backend::reference, view(bad.data(), {3})),
               ArgumentError, "'weight_scale': must be positive and finite");
  CHECK_THROWS(PackedWeights::pack(view(f.w.data(), {3, 8}), 8, 0, Backend::reference, view(bad.data(), {2})),
               ArgumentError, "'weight_scale': must hold one value, one per output channel ([3]); got shape [2]");
  std::vector<float> grouped(6, 0.1f);
  CHECK_THROWS(PackedWeights::pack(view(f.w.data(), {3, 8}), 8, 0, Backend::reference, view(grouped.data(), {3, 2})),
               ArgumentError, "'weight_scale': must hold one value, one per output channel ([3]); got shape [3, 2]");
  std::vector<std::int32_t> wrong_dtype(3, 1);
  CHECK_THROWS(PackedWeights::pack(view(f.w.data(), {3, 8}), 8, 0, Backend::reference, view(wrong_dtype.data(), {3})),
               DTypeError, "'weight_scale': expected dtype float32");

  // Carried: gemm takes no w_scale and gives the bits of the explicit call.
  const PackedWeights carried =
      PackedWeights::pack(view(f.w.data(), {3, 8}), 8, 0, Backend::reference, view(f.w_scale.data(), {3}));
  CHECK(carried.has_weight_scales());
  CHECK_EQ(carried.weight_scale_groups(), 1);
  CHECK(!f.packed.has_weight_scales());
  auto args = f.args();
  CHECK_THROWS(gemm(args, carried), ArgumentError, "'w_scale': must not be given: these weights carry their scales");
  std::vector<float> explicit_out(6);
  args.out = view(explicit_out.data(), {2, 3});
  gemm(args, f.packed);
  args = f.args();
  args.w_scale = TensorView{};
  CHECK_THROWS(gemm(args, f.packed), ArgumentError, "'w_scale': is required: these weights carry no scales");
  gemm(args, carried);
  CHECK(f.out == explicit_out);
  // One value is kept per channel; per-group scales as [N, groups].
  float one = 0.25f;
  const PackedWeights single = PackedWeights::pack(view(f.w.data(), {3, 8}), 8, 0, Backend::reference, view(&one, {1}));
  CHECK(single.weight_scales() == std::vector<float>(3, 0.25f));
  const PackedWeights groups = PackedWeights::pack(view(f.w.data(), {3, 8}), 8, 4, Backend::reference,
                                                   view(grouped.data(), {3, 2}));
  CHECK_EQ(groups.weight_scale_groups(), 2);
}

TEST(unknown_names_are_rejected) {
  CHECK_THROWS(parse_backend("tpu"), ArgumentError, "unknown backend 'tpu'");
  CHECK_THROWS(parse_activation("tanh"), ArgumentError, "unknown activation 'tanh'");
  CHECK_THROWS(set_num_threads(-1), ArgumentError, "'num_threads'");
  CHECK_THROWS(ThreadCountScope(-2), ArgumentError, "'num_threads'");
}

TEST(thread_count_scope_applies_to_the_calling_thread_only) {
  set_num_threads(3);
  {
    const ThreadCountScope outer(2);
    CHECK_EQ(get_num_threads(), 2);
    int other = 0;
    std::thread([&] { other = get_num_threads(); }).join();
    CHECK_EQ(other, 3);  // another thread keeps the process-wide setting
    {
      const ThreadCountScope unchanged(0);
      CHECK_EQ(get_num_threads(), 2);
      const ThreadCountScope inner(1);
      CHECK_EQ(get_num_threads(), 1);
    }
    CHECK_EQ(get_num_threads(), 2);  // restored when the inner scopes end
  }
  CHECK_EQ(get_num_threads(), 3);
  set_num_threads(0);
}

OSENGINE_TEST_MAIN
