// Scalar fp32 helpers shared by every CPU backend. The AVX2 kernels mirror these operation by operation
// (same fma, same rounding), so the reference and the optimized paths give the same floats.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace osengine::detail {

inline float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bf16_to_float(std::uint16_t h) { return bits_to_float(static_cast<std::uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN.
inline std::uint16_t float_to_bf16(float f) {
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

inline float exp_approx(float x) {
  using namespace expc;
  x = std::fmin(std::fmax(x, lo), hi);
  const float n = std::nearbyint(x * log2e);
  float r = std::fma(n, -ln2_hi, x);
  r = std::fma(n, -ln2_lo, r);
  float p = c7;
  p = std::fma(p, r, c6);
  p = std::fma(p, r, c5);
  p = std::fma(p, r, c4);
  p = std::fma(p, r, c3);
  p = std::fma(p, r, c2);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const std::uint32_t scale_bits = static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127) << 23;
  return p * bits_to_float(scale_bits);
}

// erf(x), Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7).
namespace erfc_ {
constexpr float p = 0.3275911f, a1 = 0.254829592f, a2 = -0.284496736f, a3 = 1.421413741f, a4 = -1.453152027f,
                a5 = 1.061405429f;
}
inline float erf_approx(float x) {
  using namespace erfc_;
  const float ax = std::fabs(x);
  const float t = 1.0f / std::fma(p, ax, 1.0f);
  float poly = a5;
  poly = std::fma(poly, t, a4);
  poly = std::fma(poly, t, a3);
  poly = std::fma(poly, t, a2);
  poly = std::fma(poly, t, a1);
  poly = poly * t;
  const float y = 1.0f - poly * exp_approx(-(ax * ax));
  return std::copysign(y, x);
}

inline float gelu_approx(float x) { return 0.5f * x * (1.0f + erf_approx(x * 0.707106781186547524f)); }

inline float gelu_tanh_approx(float x) {
  const float u = 0.797884560802865356f * std::fma(0.044715f * x, x * x, x);
  const float tanh_u = 1.0f - 2.0f / (exp_approx(2.0f * u) + 1.0f);
  return 0.5f * x * (1.0f + tanh_u);
}

inline float silu_approx(float x) { return x / (1.0f + exp_approx(-x)); }

}  // namespace osengine::detail
