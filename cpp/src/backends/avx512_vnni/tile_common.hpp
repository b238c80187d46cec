// Pieces shared by the AVX-512 VNNI W8 and W4 tiles (gemm_w8.cpp, gemm_w4.cpp): the vpdpbusd step, a row's 16 int32
// column sums folded into its fp32 accumulator as one zmm (the AVX2 backend's fold_group, 16 lanes at a time: the
// same operations in the same order, so the same bits), and a tile's end (TileEnd): the groups' sums added up or
// folded, then handed to the AVX2 backend's epilogue as two 8-lane halves.
#pragma once
#include "backends/avx2/gemm_common.hpp"
#include "backends/avx512_vnni/avx512_vnni.hpp"

namespace osengine::detail::vnni {

// acc += the u8 x s8 products of `u` (unsigned bytes) and `s` (signed bytes), four per int32 lane (vpdpbusd). With
// GCC in inline asm: GCC 12's register allocation around the intrinsic copies every accumulator to another register
// and back at each use (twice the instructions of the loop, and spills).
OSENGINE_AVX512_VNNI inline void dpbusd(__m512i& acc, __m512i u, __m512i s) {
#if defined(__GNUC__) && !defined(__clang__)
  asm("vpdpbusd %[s], %[u], %[acc]" : [acc] "+v"(acc) : [u] "v"(u), [s] "v"(s));
#else
  acc = _mm512_dpbusd_epi32(acc, u, s);
#endif
}

// GCC 12 warns that the unused pass-through operand of the plain 512-bit conversions and extracts is uninitialized;
// their zero-masking forms with every lane selected are the same instructions' results without it.
constexpr __mmask16 kAll16 = 0xffff;
constexpr __mmask8 kAll8 = 0xff;

// The 16 weight scales of group g of the panel (float32, or float16 bits holding exactly those floats).
OSENGINE_AVX512_VNNI inline __m512 weight_scales(const avx2_gemm::PanelParams& pp, std::int64_t g) {
  if (pp.w_scale_f16 != nullptr)
    return _mm512_maskz_cvtph_ps(
        kAll16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pp.w_scale_f16 + g * pp.ws_gstride)));
  return _mm512_loadu_ps(pp.w_scale + g * pp.ws_gstride);
}

// y[r] = fma(float(sums[r]), a_scale(row m0 + r, group g) * w_scale, y[r]) for the tile's MR rows.
template <int MR>
OSENGINE_AVX512_VNNI inline void fold_group(const GemmProblem& p, const avx2_gemm::PanelParams& pp, std::int64_t m0,
                                            std::int64_t g, const __m512i (&sums)[MR], __m512 (&y)[MR]) {
  const __m512 ws = weight_scales(pp, g);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512 as = _mm512_set1_ps(p.a_scale[(m0 + r) * p.a_scale_stride_m + g * p.a_scale_stride_g]);
    y[r] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(kAll16, sums[r]), _mm512_mul_ps(as, ws), y[r]);
  }
}

// A zmm of 16 columns as the two 8-column halves the AVX2 epilogue takes.
OSENGINE_AVX512_VNNI inline void split(__m512i v, __m256i (&halves)[2]) {
  halves[0] = _mm512_maskz_extracti64x4_epi64(kAll8, v, 0);
  halves[1] = _mm512_maskz_extracti64x4_epi64(kAll8, v, 1);
}
OSENGINE_AVX512_VNNI inline void split(__m512 v, __m256 (&halves)[2]) {
  halves[0] = _mm256_castsi256_ps(_mm512_maskz_extracti64x4_epi64(kAll8, _mm512_castps_si512(v), 0));
  halves[1] = _mm256_castsi256_ps(_mm512_maskz_extracti64x4_epi64(kAll8, _mm512_castps_si512(v), 1));
}

// What a tile of MR rows does with each group's int32 column sums and at its end. With an epilogue over several
// groups the sums are folded into fp32 rows that start from the bias (fold_group), which end in the AVX2
// finish_row (activation, residual, store); otherwise they are added up and end in the AVX2 finish_tile (raw
// accumulators, or the whole epilogue).
template <int MR>
struct TileEnd {
  const GemmProblem& p;
  const avx2_gemm::PanelParams& pp;
  std::int64_t m0;
  bool grouped;
  __m512i total[MR];
  __m512 y[MR];

  OSENGINE_AVX512_VNNI TileEnd(const GemmProblem& problem, const avx2_gemm::PanelParams& panel, std::int64_t row0,
                               std::int64_t groups)
      : p(problem), pp(panel), m0(row0), grouped(problem.out_accumulators == nullptr && groups > 1) {
    const __m512 start = grouped ? _mm512_loadu_ps(pp.bias.data()) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      total[r] = _mm512_setzero_si512();
      y[r] = start;
    }
  }

  OSENGINE_AVX512_VNNI void add_group(std::int64_t g, const __m512i (&sums)[MR]) {
    if (grouped) {
      fold_group<MR>(p, pp, m0, g, sums, y);
      return;
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) total[r] = _mm512_add_epi32(total[r], sums[r]);
  }

  OSENGINE_AVX512_VNNI void finish() const {
    if (grouped) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        __m256 halves[2];
        split(y[r], halves);
        avx2_gemm::finish_row(p, m0 + r, pp.n0, pp.nvalid, halves[0], halves[1]);
      }
      return;
    }
    __m256i halves[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) split(total[r], halves[r]);
    avx2_gemm::finish_tile<MR>(p, pp, m0, halves);
  }
};

}  // namespace osengine::detail::vnni
