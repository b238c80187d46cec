// Every registered CPU backend against the scalar reference, through the public API: identical int8 codes, delta and
// zero points, identical int32 accumulators and bit-identical fp32 / bf16 GEMM outputs. The backends come from the
// table (backends/registry.cpp): a new backend is tested by being registered. The file also registers a variant of
// its own, to show that a registration is picked up, and shows that a wrong kernel registered the same way fails.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "harness.hpp"
#include "core/float_math.hpp"
#include "backends/kernels.hpp"
#include "backends/reference/reference.hpp"
#include "osengine/osengine.hpp"
#include "test_util.hpp"

using namespace osengine;
using osengine_test::random_codes;
using osengine_test::random_floats;

namespace {

// The backends checked against the reference: every registered CPU backend that runs here, but the reference.
std::vector<std::string> backends_under_test() {
  std::vector<std::string> names;
  for (const detail::Kernels& k : detail::registered_kernels())
    if (k.device == Device::cpu && k.available() && k.name != "reference") names.push_back(k.name);
  return names;
}

// A test of one backend (by name), run for each of backends_under_test().
#define BACKEND_TEST(name)                                             \
  static void name(const std::string& backend);                       \
  TEST(name##_every_backend) {                                         \
    for (const std::string& backend : backends_under_test()) name(backend); \
  }                                                                    \
  static void name(const std::string& backend)

// A backend registered by this test, as a new backend registers itself in backends/registry.cpp: it must show up in
// backends_under_test() and go through every check above. It is the reference's kernels under another name (the
// point is the registration, not new arithmetic).
const char* const kVariant = "reference-variant";
detail::Kernels variant_kernels() {
  detail::Kernels k = *detail::find_kernels("reference");
  k.name = kVariant;
  return k;
}
const bool kVariantRegistered = [] {
  detail::register_backend(variant_kernels());
  return true;
}();

TensorView tv(void* p, DType dt, std::vector<std::int64_t> shape) { return TensorView(p, dt, std::move(shape)); }

// The nearest float16 value (normal range) as a float: scales a float16-rounding quantizer would produce.
float round_to_float16(float x) {
  int exponent = 0;
  const float mantissa = std::frexp(x, &exponent);  // x = mantissa 2^exponent, mantissa in [0.5, 1)
  return std::ldexp(std::nearbyint(std::ldexp(mantissa, 11)), exponent - 11);
}

std::vector<std::uint8_t> nibbles(const std::vector<std::int8_t>& codes) { return osengine_test::pack_nibbles(codes); }

// weight_scale (optional): scales the packed weights carry.
PackedWeights pack_for(const std::vector<std::int8_t>& codes, std::vector<std::uint8_t>& packed4, std::int64_t n,
                       std::int64_t k, int bits, std::int64_t group, const std::string& backend,
                       const TensorView& weight_scale = {}) {
  if (bits == 8)
    return PackedWeights::pack(tv(const_cast<std::int8_t*>(codes.data()), DType::int8, {n, k}), 8, group, backend,
                               weight_scale);
  packed4 = nibbles(codes);
  return PackedWeights::pack(tv(packed4.data(), DType::uint8, {n, k / 2}), 4, group, backend, weight_scale);
}

template <typename T>
void check_same_bytes(const std::vector<T>& a, const std::vector<T>& b, const std::string& what) {
  CHECK_EQ(a.size(), b.size());
  if (std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) != 0) {
    for (std::size_t i = 0; i < a.size(); ++i)
      if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) {
        std::ostringstream msg;
        msg << what << ": first difference at " << i << ": " << +a[i] << " vs " << +b[i];
        throw osengine_test::Failure(msg.str());
      }
  }
}

// ---------------------------------------------------------------------------------------------------------------
struct GemmCase {
  std::int64_t m = 1, n = 1, k = 2;
  int wbits = 8;
  bool a_int4 = false;
  std::int64_t group = 0;
  Activation act = Activation::none;
  DType out = DType::float32;
  bool residual = false;
  DType residual_dtype = DType::float32;
  bool zp = false;
  int a_scale_kind = 1;  // 0 one value, 1 per token, 2 per token and group
  int w_scale_kind = 1;  // 0 one value, 1 per channel, 2 per channel and group
  bool bias = true;
  bool extreme = false;  // A = -128 / W = +-127 everywhere
  bool nonfinite_residual = false;  // NaN / +-Inf / huge residual entries (bf16 NaN and overflow rounding)
  int zp_value = 1000;   // != 1000: every activation zero point takes this value
  std::uint32_t seed = 1;
};

std::string describe(const GemmCase& c) {
  std::ostringstream s;
  s << "m=" << c.m << " n=" << c.n << " k=" << c.k << " w" << c.wbits << (c.a_int4 ? "a4" : "a8") << " g=" << c.group
    << " act=" << activation_name(c.act) << " out=" << dtype_name(c.out) << " res=" << c.residual
    << " zp=" << c.zp << " as=" << c.a_scale_kind << " ws=" << c.w_scale_kind;
  return s.str();
}

void run_gemm_case(const GemmCase& c, const std::string& backend) {
  const std::int64_t m = c.m, n = c.n, k = c.k;
  const std::int64_t groups = c.group > 0 ? k / c.group : 1;
  const int alo = c.a_int4 ? -8 : -128, ahi = c.a_int4 ? 7 : 127;
  const int wlo = c.wbits == 4 ? -8 : -127, whi = c.wbits == 4 ? 7 : 127;
  std::vector<std::int8_t> a = random_codes(static_cast<std::size_t>(m * k), c.seed, alo, ahi);
  std::vector<std::int8_t> w = random_codes(static_cast<std::size_t>(n * k), c.seed + 1, wlo, whi);
  if (c.extreme) {
    for (auto& x : a) x = static_cast<std::int8_t>(alo);
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<std::int8_t>((i / static_cast<std::size_t>(k)) % 2 ? whi : wlo);
  }
  std::vector<std::uint8_t> w4_ref, w4_avx;
  const PackedWeights ref = pack_for(w, w4_ref, n, k, c.wbits, c.group, "reference");
  const PackedWeights avx = pack_for(w, w4_avx, n, k, c.wbits, c.group, backend);
  CHECK_EQ(avx.backend_name(), backend);

  std::vector<std::uint8_t> a4;
  TensorView av;
  if (c.a_int4) {
    a4 = nibbles(a);
    av = tv(a4.data(), DType::uint8, {m, k / 2});
  } else {
    av = tv(a.data(), DType::int8, {m, k});
  }
  const ActivationFormat fmt = c.a_int4 ? ActivationFormat::int4_packed : ActivationFormat::int8;

  // Raw accumulators (always checked): exact int32.
  std::vector<std::int32_t> acc_ref(static_cast<std::size_t>(m * n)), acc_avx(static_cast<std::size_t>(m * n), -1);
  gemm_accumulate(av, fmt, ref, tv(acc_ref.data(), DType::int32, {m, n}));
  gemm_accumulate(av, fmt, avx, tv(acc_avx.data(), DType::int32, {m, n}));
  check_same_bytes(acc_ref, acc_avx, "accumulators " + backend + " " + describe(c));
  if (c.extreme) {
    // Every product is +-128 * 127 (or -8 * +-8 / -8 * 7): check against the closed form too.
    for (std::int64_t row = 0; row < m; ++row)
      for (std::int64_t col = 0; col < n; ++col)
        CHECK_EQ(acc_avx[static_cast<std::size_t>(row * n + col)], static_cast<std::int32_t>(k * alo * (col % 2 ? whi : wlo)));
  }

  // Epilogue.
  std::vector<float> a_scale, w_scale, bias;
  std::vector<std::int32_t> a_zp;
  std::vector<std::int64_t> as_shape, ws_shape;
  std::mt19937 gen(c.seed + 7);
  std::uniform_real_distribution<float> scale_dist(0.5f, 2.0f);
  const float a_base = c.a_int4 ? 0.2f : 0.02f, w_base = c.wbits == 4 ? 0.2f : 0.02f;
  const float norm = 2.0f / std::sqrt(static_cast<float>(k));  // y of order a few units: exercises the activations
  switch (c.a_scale_kind) {
    case 0: as_shape = {1}; break;
    case 1: as_shape = {m}; break;
    default: as_shape = {m, groups}; break;
  }
  switch (c.w_scale_kind) {
    case 0: ws_shape = {1}; break;
    case 1: ws_shape = {n}; break;
    default: ws_shape = {n, groups}; break;
  }
  std::int64_t as_count = 1, ws_count = 1;
  for (auto d : as_shape) as_count *= d;
  for (auto d : ws_shape) ws_count *= d;
  for (std::int64_t i = 0; i < as_count; ++i) a_scale.push_back(a_base * scale_dist(gen));
  for (std::int64_t i = 0; i < ws_count; ++i) w_scale.push_back(w_base * norm * scale_dist(gen));
  if (c.zp) {
    std::uniform_int_distribution<int> zd(alo, ahi);
    for (std::int64_t i = 0; i < as_count; ++i) a_zp.push_back(c.zp_value != 1000 ? c.zp_value : zd(gen));
  }
  if (c.bias) {
    bias = random_floats(static_cast<std::size_t>(n), c.seed + 3, 3.0f);
    if (n > 2) {
      bias[0] = 120.0f;  // far in the activations' clamped / saturated ranges
      bias[1] = -120.0f;
    }
  }
  std::vector<float> res_f;
  std::vector<std::uint16_t> res_h;
  TensorView res;
  if (c.residual) {
    res_f = random_floats(static_cast<std::size_t>(m * n), c.seed + 5, 2.0f);
    if (c.nonfinite_residual)
      for (std::size_t i = 0; i < res_f.size(); i += 7)
        res_f[i] = i % 3 == 0 ? std::nanf("") : (i % 3 == 1 ? INFINITY : -3.3895e38f);
    if (c.residual_dtype == DType::bfloat16) {
      for (float x : res_f) res_h.push_back(detail::float_to_bf16(x));
      res = tv(res_h.data(), DType::bfloat16, {m, n});
    } else {
      res = tv(res_f.data(), DType::float32, {m, n});
    }
  }
  GemmArgs args;
  args.a = av;
  args.a_format = fmt;
  args.a_scale = tv(a_scale.data(), DType::float32, as_shape);
  if (c.zp) args.a_zero_point = tv(a_zp.data(), DType::int32, as_shape);
  args.w_scale = tv(w_scale.data(), DType::float32, ws_shape);
  if (c.bias) args.bias = tv(bias.data(), DType::float32, {n});
  args.residual = res;
  args.activation = c.act;
  if (c.out == DType::float32) {
    std::vector<float> o_ref(static_cast<std::size_t>(m * n)), o_avx(static_cast<std::size_t>(m * n), -7.0f);
    args.out = tv(o_ref.data(), DType::float32, {m, n});
    gemm(args, ref);
    args.out = tv(o_avx.data(), DType::float32, {m, n});
    gemm(args, avx);
    check_same_bytes(o_ref, o_avx, "fp32 out " + backend + " " + describe(c));
    // The same scales carried by the weights (checked at pack; the backend may rearrange them, and keep scales
    // that are all exact float16 values in float16): the reference's bits, for float32 and float16-exact scales.
    for (const bool f16 : {false, true}) {
      std::vector<float> scales = w_scale;
      if (f16)
        for (float& s : scales) s = round_to_float16(s);
      args.w_scale = tv(scales.data(), DType::float32, ws_shape);
      args.out = tv(o_ref.data(), DType::float32, {m, n});
      gemm(args, ref);
      std::vector<std::uint8_t> w4_carried;
      const PackedWeights carried =
          pack_for(w, w4_carried, n, k, c.wbits, c.group, backend, tv(scales.data(), DType::float32, ws_shape));
      CHECK(carried.has_weight_scales());
      if (backend == "avx2" && c.wbits == 4 && c.w_scale_kind == 2 && groups > 1)  // its float16 path is under test
        CHECK_EQ(carried.arranged_weight_scales_f16().empty(), !f16);
      GemmArgs carried_args = args;
      carried_args.w_scale = TensorView{};
      carried_args.out = tv(o_avx.data(), DType::float32, {m, n});
      std::fill(o_avx.begin(), o_avx.end(), -7.0f);
      gemm(carried_args, carried);
      check_same_bytes(o_ref, o_avx, std::string("fp32 out, carried ") + (f16 ? "float16-exact " : "") + "scales " +
                                         backend + " " + describe(c));
    }
  } else {
    std::vector<std::uint16_t> o_ref(static_cast<std::size_t>(m * n)), o_avx(static_cast<std::size_t>(m * n), 1);
    args.out = tv(o_ref.data(), DType::bfloat16, {m, n});
    gemm(args, ref);
    args.out = tv(o_avx.data(), DType::bfloat16, {m, n});
    gemm(args, avx);
    check_same_bytes(o_ref, o_avx, "bf16 out " + backend + " " + describe(c));
  }
}

const Activation kActs[] = {Activation::none, Activation::relu, Activation::gelu, Activation::gelu_tanh,
                            Activation::silu};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
BACKEND_TEST(pack_unpack_round_trip) {
  for (int bits : {8, 4})
    for (std::int64_t n : {1, 3, 16, 17, 64})
      for (std::int64_t k : {2, 4, 6, 18, 64, 130}) {
        std::vector<std::int8_t> w = random_codes(static_cast<std::size_t>(n * k), static_cast<std::uint32_t>(n * k + bits),
                                                  bits == 8 ? -127 : -8, bits == 8 ? 127 : 7);
        std::vector<std::uint8_t> p4;
        const PackedWeights pw = pack_for(w, p4, n, k, bits, 0, backend);
        CHECK(pw.padded_n() >= n);
        CHECK(pw.padded_k() >= k);
        CHECK_EQ(reinterpret_cast<std::uintptr_t>(pw.data()) % 64, std::uintptr_t{0});  // on a cache line
        std::vector<std::int8_t> back(static_cast<std::size_t>(n * k), 99);
        pw.unpack(tv(back.data(), DType::int8, {n, k}));
        check_same_bytes(w, back, "round trip");
        // Some rows, repeated and out of order (an embedding lookup in a tied lm_head's packed weights).
        std::vector<std::int32_t> rows = {static_cast<std::int32_t>(n - 1), 0, static_cast<std::int32_t>(n / 2),
                                          static_cast<std::int32_t>(n - 1)};
        std::vector<std::int8_t> got(rows.size() * static_cast<std::size_t>(k), 99), want;
        for (std::int32_t r : rows) want.insert(want.end(), w.begin() + r * k, w.begin() + (r + 1) * k);
        pw.unpack_rows(tv(rows.data(), DType::int32, {4}), tv(got.data(), DType::int8, {4, k}));
        check_same_bytes(want, got, "unpack_rows");
      }
  // Odd K (int8 only).
  for (std::int64_t k : {1, 3, 17, 4095}) {
    std::vector<std::int8_t> w = random_codes(static_cast<std::size_t>(5 * k), 11, -127, 127);
    std::vector<std::uint8_t> p4;
    const PackedWeights pw = pack_for(w, p4, 5, k, 8, 0, backend);
    std::vector<std::int8_t> back(static_cast<std::size_t>(5 * k));
    pw.unpack(tv(back.data(), DType::int8, {5, k}));
    check_same_bytes(w, back, "round trip odd k");
  }
}

BACKEND_TEST(gemm_accumulators_shapes) {
  // One dimension large at a time, the others small; odd K for W8A8; every weight / activation format.
  const std::int64_t small[] = {1, 3, 17, 64};
  std::uint32_t seed = 100;
  for (std::int64_t m : small)
    for (std::int64_t n : small)
      for (std::int64_t k : {1, 3, 17, 64, 66}) {
        GemmCase c;
        c.m = m, c.n = n, c.k = k, c.seed = seed++;
        run_gemm_case(c, backend);
        if (k % 2 == 0) {
          c.wbits = 4;
          run_gemm_case(c, backend);
          c.a_int4 = true;
          run_gemm_case(c, backend);
        }
      }
  for (int which = 0; which < 3; ++which)
    for (int fmt = 0; fmt < 3; ++fmt) {
      GemmCase c;
      c.m = which == 0 ? 4095 : 3;
      c.n = which == 1 ? 4095 : 17;
      c.k = which == 2 ? (fmt == 0 ? 4095 : 4094) : 64;
      c.wbits = fmt == 0 ? 8 : 4;
      c.a_int4 = fmt == 2;
      c.seed = seed++;
      run_gemm_case(c, backend);
    }
  // A mid-size case that exercises full 6-row tiles, several M blocks and both threads.
  for (int fmt = 0; fmt < 3; ++fmt) {
    GemmCase c;
    c.m = 100, c.n = 97, c.k = 1000, c.wbits = fmt == 0 ? 8 : 4, c.a_int4 = fmt == 2, c.seed = seed++;
    run_gemm_case(c, backend);
  }
}

BACKEND_TEST(gemm_no_saturation_extremes) {
  // a = -128 on every k against w = -127 / +127: each vpmaddwd pair is +-32512, sums are exact.
  for (std::int64_t k : {2, 64, 4095, 65536}) {
    GemmCase c;
    c.m = k == 65536 ? 2 : 7, c.n = 18, c.k = k, c.extreme = true, c.seed = 5;
    if (k == 65536) c.n = 4;
    run_gemm_case(c, backend);
  }
  // With the largest zero point: a - zp = -255 on every k, |acc - zp * colsum| up to 2.12e9 (K = 65536).
  for (int zp : {127, -128})
    for (std::int64_t group : {0, 128}) {
      GemmCase c;
      c.m = 3, c.n = 4, c.k = 65536, c.extreme = true, c.zp = true, c.zp_value = zp, c.group = group;
      c.a_scale_kind = group ? 2 : 1, c.seed = 8;
      run_gemm_case(c, backend);
    }
  for (std::int64_t k : {2, 64, 4094}) {
    GemmCase c;
    c.m = 7, c.n = 18, c.k = k, c.wbits = 4, c.a_int4 = true, c.extreme = true, c.seed = 6;
    c.zp = true, c.zp_value = 7;
    run_gemm_case(c, backend);
    c.a_int4 = false;
    run_gemm_case(c, backend);
  }
}

BACKEND_TEST(gemm_epilogue_variants) {
  std::uint32_t seed = 1000;
  for (Activation act : kActs)
    for (DType out : {DType::float32, DType::bfloat16})
      for (int res = 0; res < 3; ++res)
        for (int zp = 0; zp < 2; ++zp) {
          GemmCase c;
          c.m = 13, c.n = 35, c.k = 96, c.act = act, c.out = out, c.residual = res > 0;
          c.residual_dtype = res == 2 ? DType::bfloat16 : DType::float32;
          c.zp = zp == 1;
          c.a_scale_kind = static_cast<int>(seed % 2);
          c.w_scale_kind = static_cast<int>((seed / 2) % 2);
          c.bias = seed % 3 != 0;
          c.seed = seed++;
          run_gemm_case(c, backend);
          c.wbits = 4;
          c.a_int4 = seed % 2 == 0;
          c.seed = seed++;
          run_gemm_case(c, backend);
        }
}

BACKEND_TEST(gemm_nonfinite_residual) {
  for (DType out : {DType::float32, DType::bfloat16})
    for (DType rd : {DType::float32, DType::bfloat16}) {
      GemmCase c;
      c.m = 8, c.n = 40, c.k = 64, c.out = out, c.residual = true, c.residual_dtype = rd, c.nonfinite_residual = true;
      c.act = Activation::gelu, c.seed = 4242;
      run_gemm_case(c, backend);
    }
}

BACKEND_TEST(gemm_groups) {
  std::uint32_t seed = 2000;
  for (std::int64_t group : {2, 6, 32, 64, 128})
    for (int fmt = 0; fmt < 3; ++fmt)
      for (int kinds = 0; kinds < 4; ++kinds) {
        GemmCase c;
        c.m = 9, c.n = 33, c.k = group == 6 ? 90 : 384;
        c.group = group;
        c.wbits = fmt == 0 ? 8 : 4;
        c.a_int4 = fmt == 2;
        c.a_scale_kind = kinds & 1 ? 2 : 1;
        c.w_scale_kind = kinds & 2 ? 2 : (kinds == 0 ? 0 : 1);
        c.zp = kinds != 1;
        c.act = kActs[seed % 5];
        c.out = seed % 2 ? DType::bfloat16 : DType::float32;
        c.residual = seed % 3 == 0;
        c.seed = seed++;
        run_gemm_case(c, backend);
      }
  // Groups with one large dimension, and M = 1 (decode).
  for (std::int64_t m : {1, 64}) {
    GemmCase c;
    c.m = m, c.n = m == 1 ? 4095 : 40, c.k = m == 1 ? 256 : 4096, c.group = 128, c.zp = true;
    c.a_scale_kind = 2, c.w_scale_kind = 2, c.act = Activation::silu, c.seed = seed++;
    run_gemm_case(c, backend);
    c.wbits = 4;
    run_gemm_case(c, backend);
  }
}

BACKEND_TEST(gemm_threads_consistent) {
  const int saved = get_num_threads();
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    GemmCase c;
    c.m = 50, c.n = 70, c.k = 512, c.group = 64, c.zp = true, c.act = Activation::gelu, c.seed = 77;
    run_gemm_case(c, backend);
  }
  set_num_threads(saved);
}

// ---------------------------------------------------------------------------------------------------------------
namespace {

struct QuantCase {
  std::int64_t m = 1, k = 8;
  bool bf16 = false, shift = false, smooth = false, dynamic = true, symmetric = true;
  int bits = 8;
  std::int64_t group = 0;
  bool per_group_params = false;
  bool rotate = false;     // the online Hadamard rotation
  int prologue = 0;        // 0: none, 1: silu_gate (x is [gate | up], 2k columns), 2: rms_norm_weight
  std::uint32_t seed = 1;
};

void run_quant_case(const QuantCase& c, const std::string& backend) {
  const std::int64_t m = c.m, k = c.k, x_cols = c.prologue == 1 ? 2 * k : k;
  std::vector<float> x = random_floats(static_cast<std::size_t>(m * x_cols), c.seed, 3.0f);
  // Outliers, exact zeros, ties of round-half-even and a row of zeros.
  for (std::size_t i = 0; i < x.size(); i += 37) x[i] = 0.0f;
  for (std::size_t i = 5; i < x.size(); i += 101) x[i] = (i % 2 ? 1.0f : -1.0f) * 200.0f;
  for (std::size_t i = 11; i < x.size(); i += 53) x[i] = 2.5f;
  if (m > 2)
    for (std::int64_t i = 0; i < x_cols; ++i) x[static_cast<std::size_t>(x_cols + i)] = 0.0f;
  std::vector<std::uint16_t> xh;
  TensorView xv;
  if (c.bf16) {
    for (float v : x) xh.push_back(detail::float_to_bf16(v));
    xv = tv(xh.data(), DType::bfloat16, {m, x_cols});
  } else {
    xv = tv(x.data(), DType::float32, {m, x_cols});
  }
  std::vector<float> norm = random_floats(static_cast<std::size_t>(k), c.seed + 4, 1.0f);
  std::vector<float> shift = random_floats(static_cast<std::size_t>(k), c.seed + 1, 1.0f);
  std::vector<float> smooth(static_cast<std::size_t>(k));
  {
    std::mt19937 gen(c.seed + 2);
    std::uniform_real_distribution<float> d(0.25f, 4.0f);
    for (auto& s : smooth) s = d(gen);
  }
  const TensorView sv = c.shift ? tv(shift.data(), DType::float32, {k}) : TensorView();
  const TensorView mv = c.smooth ? tv(smooth.data(), DType::float32, {k}) : TensorView();
  QuantizeOptions opt;
  opt.bits = c.bits;
  opt.symmetric = c.symmetric;
  opt.group_size = c.group;
  opt.rotate = c.rotate;
  opt.silu_gate = c.prologue == 1;
  if (c.prologue == 2) {
    opt.rms_norm_weight = tv(norm.data(), DType::float32, {k});
    opt.rms_norm_eps = 1e-5f;
  }
  const std::int64_t groups = c.group > 0 ? k / c.group : 1;
  std::vector<std::int8_t> q_ref(static_cast<std::size_t>(m * k)), q_avx(static_cast<std::size_t>(m * k), 99);
  std::ostringstream what;
  what << "quantize m=" << m << " k=" << k << " bf16=" << c.bf16 << " shift=" << c.shift << " smooth=" << c.smooth
       << " dyn=" << c.dynamic << " sym=" << c.symmetric << " bits=" << c.bits << " g=" << c.group
       << " rotate=" << c.rotate << " prologue=" << c.prologue;
  if (c.dynamic) {
    std::vector<float> d_ref(static_cast<std::size_t>(m * groups)), d_avx(static_cast<std::size_t>(m * groups), -1.0f);
    std::vector<std::int32_t> z_ref(static_cast<std::size_t>(m * groups)), z_avx(static_cast<std::size_t>(m * groups), 99);
    const std::vector<std::int64_t> pshape = groups > 1 ? std::vector<std::int64_t>{m, groups} : std::vector<std::int64_t>{m};
    opt.backend = Backend::reference;
    quantize_dynamic(xv, sv, mv, tv(q_ref.data(), DType::int8, {m, k}), tv(d_ref.data(), DType::float32, pshape),
                     tv(z_ref.data(), DType::int32, pshape), opt);
    opt.backend = backend;
    quantize_dynamic(xv, sv, mv, tv(q_avx.data(), DType::int8, {m, k}), tv(d_avx.data(), DType::float32, pshape),
                     tv(z_avx.data(), DType::int32, pshape), opt);
    check_same_bytes(d_ref, d_avx, what.str() + " delta");
    check_same_bytes(z_ref, z_avx, what.str() + " zero_point");
  } else {
    const std::int64_t np = c.per_group_params ? groups : 1;
    std::vector<float> delta;
    std::vector<std::int32_t> zp;
    std::mt19937 gen(c.seed + 3);
    std::uniform_real_distribution<float> d(0.01f, 0.2f);
    const CodeRange range = code_range(c.bits, c.symmetric);
    std::uniform_int_distribution<int> zd(range.qmin, range.qmax);
    for (std::int64_t i = 0; i < np; ++i) {
      delta.push_back(d(gen));
      zp.push_back(c.symmetric ? 0 : zd(gen));
    }
    const TensorView dv = tv(delta.data(), DType::float32, {np});
    const TensorView zv = c.symmetric && c.seed % 2 ? TensorView() : tv(zp.data(), DType::int32, {np});
    opt.backend = Backend::reference;
    quantize_static(xv, sv, mv, dv, zv, tv(q_ref.data(), DType::int8, {m, k}), opt);
    opt.backend = backend;
    quantize_static(xv, sv, mv, dv, zv, tv(q_avx.data(), DType::int8, {m, k}), opt);
  }
  check_same_bytes(q_ref, q_avx, what.str() + " codes");
}

}  // namespace

BACKEND_TEST(quantize_matches_reference) {
  std::uint32_t seed = 3000;
  for (std::int64_t m : {1, 3, 17})
    for (std::int64_t k : {1, 8, 17, 64, 96})
      for (int variant = 0; variant < 16; ++variant) {
        QuantCase c;
        c.m = m, c.k = k;
        c.bf16 = variant & 1;
        c.shift = variant & 2;
        c.smooth = variant & 4;
        c.dynamic = variant & 8;
        c.symmetric = seed % 3 != 0;
        c.bits = seed % 4 == 0 ? 4 : 8;
        c.group = (k % 32 == 0 && seed % 2 == 0) ? 32 : 0;
        c.per_group_params = seed % 5 < 3;
        c.seed = seed++;
        run_quant_case(c, backend);
      }
  for (int bits : {2, 3, 4, 5, 8})
    for (int sym = 0; sym < 2; ++sym)
      for (int dyn = 0; dyn < 2; ++dyn) {
        QuantCase c;
        c.m = 64, c.k = 4095, c.bits = bits, c.symmetric = sym, c.dynamic = dyn, c.shift = true, c.smooth = true;
        c.seed = seed++;
        run_quant_case(c, backend);
        c.m = 4095, c.k = 64, c.group = 32, c.bf16 = true, c.per_group_params = true;
        run_quant_case(c, backend);
      }
}

BACKEND_TEST(quantize_rotated_matches_reference) {
  // The online Hadamard rotation: the orders of real widths (Paley bases 12, 28, 36 and Sylvester blocks of every
  // length up to 512), every row count the kernels split differently, static / dynamic, symmetric / asymmetric,
  // groups over the rotated row, bit widths 2..8, the SiLU gate (down_proj's input) and the RMSNorm prologues.
  std::uint32_t seed = 5000;
  for (std::int64_t k : {1, 2, 4, 12, 16, 24, 28, 36, 576, 1536, 4096})
    for (std::int64_t m : {1, 3, 17, 64})
      for (int variant = 0; variant < 6; ++variant) {
        QuantCase c;
        c.m = m, c.k = k, c.rotate = true;
        c.dynamic = variant % 2 == 0;
        c.symmetric = variant % 3 != 0;
        c.prologue = variant < 3 ? 1 : (variant == 3 ? 2 : 0);  // silu_gate in half the cases
        c.shift = variant >= 2;
        c.smooth = variant >= 4;
        c.bf16 = variant == 5;
        c.bits = 2 + static_cast<int>(seed % 7);
        // groups: a quarter of the row (the blocks of the rotation straddle them), or one group
        c.group = (k % 4 == 0 && variant % 2 == 1) ? k / 4 : 0;
        c.per_group_params = variant % 3 == 1;
        c.seed = seed++;
        run_quant_case(c, backend);
      }
}

BACKEND_TEST(quantize_rotated_nonfinite_row) {
  // A NaN anywhere in a row reaches every rotated value: the row is reported, as without the rotation.
  const std::int64_t m = 9, k = 24;
  std::vector<float> x = random_floats(static_cast<std::size_t>(m * k), 11, 1.0f);
  x[static_cast<std::size_t>(6 * k + 17)] = std::nanf("");
  std::vector<std::int8_t> codes(static_cast<std::size_t>(m * k));
  std::vector<float> delta(static_cast<std::size_t>(m));
  std::vector<std::int32_t> zp(static_cast<std::size_t>(m));
  detail::QuantizeProblem p;
  p.x = x.data();
  p.m = m, p.k = k, p.group_size = k, p.qmin = -127, p.qmax = 127, p.dynamic = true;
  p.out_delta = delta.data(), p.out_zero_point = zp.data(), p.codes = codes.data();
  p.rotate = true;
  p.hadamard = detail::hadamard_plan(k);
  CHECK_EQ(detail::quantize_reference(p), 6);
  CHECK_EQ(detail::find_kernels(backend)->quantize(p), 6);
  // finite x whose rotated sums overflow: row 2
  std::vector<float> x2 = random_floats(static_cast<std::size_t>(m * k), 12, 1.0f);
  for (std::int64_t i = 0; i < k; ++i) x2[static_cast<std::size_t>(2 * k + i)] = 3e38f;
  p.x = x2.data();
  CHECK_EQ(detail::quantize_reference(p), 2);
  CHECK_EQ(detail::find_kernels(backend)->quantize(p), 2);
}

BACKEND_TEST(quantize_nonfinite_row) {
  const std::int64_t m = 40, k = 37;
  for (int where : {0, 5, 36}) {
    std::vector<float> x = random_floats(static_cast<std::size_t>(m * k), 9, 1.0f);
    x[static_cast<std::size_t>(23 * k + where)] = std::nanf("");
    x[static_cast<std::size_t>(31 * k + 2)] = INFINITY;
    std::vector<std::int8_t> codes(static_cast<std::size_t>(m * k));
    std::vector<float> delta(static_cast<std::size_t>(m));
    std::vector<std::int32_t> zp(static_cast<std::size_t>(m));
    detail::QuantizeProblem p;
    p.x = x.data();
    p.m = m, p.k = k, p.group_size = k, p.qmin = -127, p.qmax = 127, p.dynamic = true;
    p.out_delta = delta.data(), p.out_zero_point = zp.data(), p.codes = codes.data();
    CHECK_EQ(detail::quantize_reference(p), 23);
    CHECK_EQ(detail::find_kernels(backend)->quantize(p), 23);
    // Overflow of (x - shift) / smooth_scale with finite x.
    std::vector<float> x2 = random_floats(static_cast<std::size_t>(m * k), 10, 1.0f);
    std::vector<float> smooth(static_cast<std::size_t>(k), 1.0f);
    smooth[static_cast<std::size_t>(where)] = 1e-38f;
    x2[static_cast<std::size_t>(7 * k + where)] = 1e3f;
    p.x = x2.data();
    p.smooth_scale = smooth.data();
    CHECK_EQ(detail::quantize_reference(p), 7);
    CHECK_EQ(detail::find_kernels(backend)->quantize(p), 7);
    p.smooth_scale = nullptr;
  }
  // Through the public API: the same error.
  std::vector<float> x = random_floats(static_cast<std::size_t>(m * k), 9, 1.0f);
  x[static_cast<std::size_t>(3 * k + 1)] = INFINITY;
  std::vector<std::int8_t> codes(static_cast<std::size_t>(m * k));
  std::vector<float> delta(static_cast<std::size_t>(m));
  std::vector<std::int32_t> zp(static_cast<std::size_t>(m));
  QuantizeOptions opt;
  opt.backend = backend;
  CHECK_THROWS(quantize_dynamic(tv(x.data(), DType::float32, {m, k}), TensorView(), TensorView(),
                                tv(codes.data(), DType::int8, {m, k}), tv(delta.data(), DType::float32, {m}),
                                tv(zp.data(), DType::int32, {m}), opt),
               std::exception, "row 3");
}

// ---------------------------------------------------------------------------------------------------------------
TEST(registered_variant_is_under_test) {
  CHECK(kVariantRegistered);
  const auto names = backends_under_test();
  CHECK(std::find(names.begin(), names.end(), kVariant) != names.end());
  const auto listed = registered_backends();
  CHECK(std::find(listed.begin(), listed.end(), kVariant) != listed.end());
  CHECK_EQ(listed.front(), std::string("reference"));
  if (cpu_has_avx2()) CHECK(std::find(names.begin(), names.end(), "avx2") != names.end());
  if (cpu_has_avx512_vnni()) CHECK(std::find(names.begin(), names.end(), "avx512_vnni") != names.end());
}

namespace {
void off_by_one_gemm(const detail::GemmProblem& p) {
  detail::gemm_reference(p);
  if (p.out_accumulators) p.out_accumulators[p.m * p.n - 1] += 1;
}
std::int64_t flipped_code_quantize(const detail::QuantizeProblem& p) {
  const std::int64_t row = detail::quantize_reference(p);
  p.codes[p.m * p.k - 1] = static_cast<std::int8_t>(p.codes[p.m * p.k - 1] == 0 ? 1 : 0);
  return row;
}
}  // namespace

// A wrong kernel registered the same way is caught by the same checks (then the variant is restored).
TEST(a_wrong_registered_kernel_is_caught) {
  detail::Kernels broken = variant_kernels();
  broken.gemm = off_by_one_gemm;
  detail::register_backend(broken);
  GemmCase c;
  c.m = 3, c.n = 17, c.k = 64;
  CHECK_THROWS(run_gemm_case(c, kVariant), osengine_test::Failure, "accumulators reference-variant");
  broken = variant_kernels();
  broken.quantize = flipped_code_quantize;
  detail::register_backend(broken);
  QuantCase q;
  q.m = 3, q.k = 17;
  CHECK_THROWS(run_quant_case(q, kVariant), osengine_test::Failure, "codes");
  detail::register_backend(variant_kernels());
  run_gemm_case(c, kVariant);
  run_quant_case(q, kVariant);
}

OSENGINE_TEST_MAIN
