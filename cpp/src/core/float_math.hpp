// The fp32 math every backend computes identically, in one definition for the host (C++) and the device (CUDA):
// bfloat16 conversions, osengine's exp / erf approximations and the activations built on them. Each operation is an
// explicitly rounded IEEE fp32 operation: on the device through the _rn intrinsics (nvcc would otherwise contract a
// product and a sum into an fma), on the host as written (the library is built with -ffp-contract=off). The AVX2
// backend mirrors these functions lane by lane (backends/avx2/float_math_avx2.hpp), the epilogue steps built on them
// are in backends/epilogue.hpp.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define OSENGINE_HD __host__ __device__ __forceinline__
#else
#define OSENGINE_HD inline
#endif

namespace osengine::detail {

// Explicitly rounded fp32 operations (never contracted).
OSENGINE_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
OSENGINE_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
OSENGINE_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
OSENGINE_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
OSENGINE_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
OSENGINE_HD float fmin_f(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fminf(a, b);
#else
  return std::fmin(a, b);
#endif
}
OSENGINE_HD float fmax_f(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return std::fmax(a, b);
#endif
}
OSENGINE_HD float fabs_f(float x) {
#if defined(__CUDA_ARCH__)
  return fabsf(x);
#else
  return std::fabs(x);
#endif
}
OSENGINE_HD float copysign_f(float magnitude, float sign) {
#if defined(__CUDA_ARCH__)
  return copysignf(magnitude, sign);
#else
  return std::copysign(magnitude, sign);
#endif
}
// Round half to even (the default rounding mode).
OSENGINE_HD float round_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}
OSENGINE_HD float bits_to_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
OSENGINE_HD std::uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

OSENGINE_HD float bf16_to_float(std::uint16_t h) { return bits_to_float(static_cast<std::uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN.
OSENGINE_HD std::uint16_t float_to_bf16(float f) {
  std::uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

// exp(x): range reduction x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial, scale by 2^n.
// Relative error ~2 ulp on [-87.3, 88.7]; inputs are clamped to that interval.
namespace expc {
constexpr float lo = -87.3f, hi = 88.7f;
constexpr float log2e = 1.44269504088896341f;
constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
constexpr float c7 = 1.0f / 5040, c6 = 1.0f / 720, c5 = 1.0f / 120, c4 = 1.0f / 24, c3 = 1.0f / 6, c2 = 0.5f;
}  // namespace expc

OSENGINE_HD float exp_approx(float x) {
  x = fmin_f(fmax_f(x, expc::lo), expc::hi);
  const float n = round_even(mul_rn(x, expc::log2e));
  float r = fma_rn(n, -expc::ln2_hi, x);
  r = fma_rn(n, -expc::ln2_lo, r);
  float p = expc::c7;
  p = fma_rn(p, r, expc::c6);
  p = fma_rn(p, r, expc::c5);
  p = fma_rn(p, r, expc::c4);
  p = fma_rn(p, r, expc::c3);
  p = fma_rn(p, r, expc::c2);
  p = fma_rn(p, r, 1.0f);
  p = fma_rn(p, r, 1.0f);
  const std::uint32_t scale_bits = static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127) << 23;
  return mul_rn(p, bits_to_float(scale_bits));
}

// erf(x), Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7).
namespace erfc_ {
constexpr float p = 0.3275911f, a1 = 0.254829592f, a2 = -0.284496736f, a3 = 1.421413741f, a4 = -1.453152027f,
                a5 = 1.061405429f;
}
OSENGINE_HD float erf_approx(float x) {
  const float ax = fabs_f(x);
  const float t = div_rn(1.0f, fma_rn(erfc_::p, ax, 1.0f));
  float poly = erfc_::a5;
  poly = fma_rn(poly, t, erfc_::a4);
  poly = fma_rn(poly, t, erfc_::a3);
  poly = fma_rn(poly, t, erfc_::a2);
  poly = fma_rn(poly, t, erfc_::a1);
  poly = mul_rn(poly, t);
  const float y = sub_rn(1.0f, mul_rn(poly, exp_approx(-mul_rn(ax, ax))));
  return copysign_f(y, x);
}

OSENGINE_HD float gelu_approx(float x) {
  return mul_rn(mul_rn(0.5f, x), add_rn(1.0f, erf_approx(mul_rn(x, 0.707106781186547524f))));
}

OSENGINE_HD float gelu_tanh_approx(float x) {
  const float u = mul_rn(0.797884560802865356f, fma_rn(mul_rn(0.044715f, x), mul_rn(x, x), x));
  const float tanh_u = sub_rn(1.0f, div_rn(2.0f, add_rn(exp_approx(mul_rn(2.0f, u)), 1.0f)));
  return mul_rn(mul_rn(0.5f, x), add_rn(1.0f, tanh_u));
}

OSENGINE_HD float silu_approx(float x) { return div_rn(x, add_rn(1.0f, exp_approx(-x))); }

}  // namespace osengine::detail
