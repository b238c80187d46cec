// AVX2 mirrors of core/float_math.hpp: every function performs the same IEEE fp32 operations in the same
// order as its scalar twin (explicit fma where the scalar code calls std::fma, true divisions, round-to-nearest-
// even for nearbyint), so each lane gives exactly the scalar result. Only include from files compiled with
// -mavx2 -mfma.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "core/float_math.hpp"

namespace osengine::detail::avx2 {

inline __m256 sign_mask_ps() { return _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u))); }

// std::fmin(std::fmax(x, lo), hi): maxps/minps return the second operand when the first is NaN, like fmax/fmin
// with a NaN x.
inline __m256 exp_approx(__m256 x) {
  using namespace expc;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-ln2_hi), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-ln2_lo), r);
  __m256 p = _mm256_set1_ps(c7);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i scale_bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale_bits));
}

inline __m256 erf_approx(__m256 x) {
  using namespace erfc_;
  const __m256 sign = sign_mask_ps();
  const __m256 ax = _mm256_andnot_ps(sign, x);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(p), ax, _mm256_set1_ps(1.0f)));
  __m256 poly = _mm256_set1_ps(a5);
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(a4));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(a3));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(a2));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(a1));
  poly = _mm256_mul_ps(poly, t);
  const __m256 e = exp_approx(_mm256_xor_ps(_mm256_mul_ps(ax, ax), sign));
  const __m256 y = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(poly, e));
  // copysign(y, x)
  return _mm256_or_ps(_mm256_andnot_ps(sign, y), _mm256_and_ps(sign, x));
}

inline __m256 gelu_approx(__m256 x) {
  const __m256 e = erf_approx(_mm256_mul_ps(x, _mm256_set1_ps(0.707106781186547524f)));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

inline __m256 gelu_tanh_approx(__m256 x) {
  const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x);
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.797884560802865356f), inner);
  const __m256 e = exp_approx(_mm256_mul_ps(_mm256_set1_ps(2.0f), u));
  const __m256 tanh_u =
      _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), tanh_u));
}

inline __m256 silu_approx(__m256 x) {
  const __m256 e = exp_approx(_mm256_xor_ps(x, sign_mask_ps()));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

// bf16 <-> fp32 for 8 lanes.
inline __m256 bf16_to_float(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load_bf16(const std::uint16_t* p) {
  return bf16_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// float_to_bf16 per lane, result in the low 16 bits of each 32-bit lane.
inline __m256i float_to_bf16_epi32(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));
  const __m256i nan_bits = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x0040));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  return _mm256_blendv_epi8(rounded, nan_bits, is_nan);
}
// 8 bf16 values as 8 uint16 in a 128-bit register.
inline __m128i float_to_bf16(__m256 f) {
  const __m256i v = float_to_bf16_epi32(f);
  return _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

}  // namespace osengine::detail::avx2
