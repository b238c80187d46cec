// AVX-512 VNNI W4 GEMM (int4 weights: W4A8, W4A4) with the fused OS+ epilogue; bit-identical to the reference
// backend. The AVX2 backend's W4 layout and scheme (backends/avx2/gemm_w4.cpp: biased weights u = w + 8 as the
// unsigned operand, the activation codes as the signed one,
//     sum_k (a - zp) w = sum_k a u - 8 * rowsum(a) - zp * colsum(w)      per group, int32, exact),
// with each step's products added by one vpdpbusd per 8 columns straight into int32 lanes (256-bit, AVX-512 VL):
// no int16 sums to flush, a third of the AVX2 kernel's instructions per step. Tiles of up to kMR rows x 16 columns;
// decode (one row) runs four chains over consecutive steps so that the vpdpbusd latency overlaps.
#include <cstring>

#include "backends/avx2/gemm_common.hpp"
#include "backends/avx512_vnni/avx512_vnni.hpp"

namespace osengine::detail {

namespace {

using namespace avx2_gemm;

constexpr int kMR = 6;

// acc[r][h] += the products of step t (4 k, 32 bytes: column c's weights in the low nibbles of bytes 4c .. 4c+3 for
// c < 8, column c + 8's in the high nibbles) with row r of a.
template <int MR>
OSENGINE_AVX512_VNNI inline void w4_step(const std::int8_t* a, std::int64_t lda, const std::uint8_t* w,
                                         std::int64_t t, __m256i (&acc)[MR][2]) {
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + t * 32));
  const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    std::int32_t four;
    std::memcpy(&four, a + r * lda + t * 4, sizeof four);
    const __m256i b = _mm256_set1_epi32(four);
    acc[r][0] = _mm256_dpbusd_epi32(acc[r][0], lo, b);
    acc[r][1] = _mm256_dpbusd_epi32(acc[r][1], hi, b);
  }
}

template <int MR>
OSENGINE_AVX512_VNNI void w4_tile(const W4Context& c, const PanelParams& pp, const std::int32_t* colsum,
                                  std::int64_t m0) {
  constexpr int kChains = MR == 1 ? 4 : 1;
  const GemmProblem& p = *c.p;
  const std::int64_t lda = c.shape.padded_k(), group_steps = c.shape.group_k / 4, groups = c.shape.groups;
  const std::int8_t* a = c.a + m0 * lda;
  const std::uint8_t* w = c.w + (pp.n0 / kNR) * c.shape.steps() * 32;
  const bool with_zp = p.a_zero_point != nullptr && p.out_accumulators == nullptr;
  const bool grouped_epilogue = !p.out_accumulators && groups > 1;
  __m256i total[MR][2];
  __m256 y[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    total[r][0] = total[r][1] = _mm256_setzero_si256();
    y[r][0] = y[r][1] = _mm256_setzero_ps();
  }
  if (grouped_epilogue) {  // y starts from the bias, one fma per group
    const __m256 b0 = _mm256_loadu_ps(pp.bias.data()), b1 = _mm256_loadu_ps(pp.bias.data() + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      y[r][0] = b0;
      y[r][1] = b1;
    }
  }
  for (std::int64_t g = 0; g < groups; ++g) {
    __m256i acc[kChains][MR][2];
#pragma GCC unroll 4
    for (int ch = 0; ch < kChains; ++ch)
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[ch][r][0] = acc[ch][r][1] = _mm256_setzero_si256();
    const std::int64_t t_end = (g + 1) * group_steps;
    std::int64_t t = g * group_steps;
    for (; t + kChains <= t_end; t += kChains) {
      // Decode (one row) streams W from memory once: fetch 4 KB ahead, every 64-byte line (two steps).
      if constexpr (MR == 1)
#pragma GCC unroll 2
        for (int ch = 0; ch < kChains; ch += 2)
          _mm_prefetch(reinterpret_cast<const char*>(w + (t + 128 + ch) * 32), _MM_HINT_T0);
#pragma GCC unroll 4
      for (int ch = 0; ch < kChains; ++ch) w4_step<MR>(a, lda, w, t + ch, acc[ch]);
    }
    for (; t < t_end; ++t) w4_step<MR>(a, lda, w, t, acc[0]);
#pragma GCC unroll 4
    for (int ch = 1; ch < kChains; ++ch)
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        acc[0][r][0] = _mm256_add_epi32(acc[0][r][0], acc[ch][r][0]);
        acc[0][r][1] = _mm256_add_epi32(acc[0][r][1], acc[ch][r][1]);
      }
    // sum (a - zp) w = sum a u - 8 rowsum(a) - zp colsum(w)   (colsum: with a zero point only)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256i bias8 = _mm256_set1_epi32(8 * c.rowsum[(m0 + r) * groups + g]);
      acc[0][r][0] = _mm256_sub_epi32(acc[0][r][0], bias8);
      acc[0][r][1] = _mm256_sub_epi32(acc[0][r][1], bias8);
      if (with_zp) {
        const __m256i cs0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + g * kNR));
        const __m256i cs1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + g * kNR + 8));
        const __m256i zp = _mm256_set1_epi32(p.a_zero_point[(m0 + r) * p.a_scale_stride_m + g * p.a_scale_stride_g]);
        acc[0][r][0] = _mm256_sub_epi32(acc[0][r][0], _mm256_mullo_epi32(zp, cs0));
        acc[0][r][1] = _mm256_sub_epi32(acc[0][r][1], _mm256_mullo_epi32(zp, cs1));
      }
    }
    if (grouped_epilogue) {
      fold_group<MR>(p, pp, m0, g, acc[0], y);
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        total[r][0] = _mm256_add_epi32(total[r][0], acc[0][r][0]);
        total[r][1] = _mm256_add_epi32(total[r][1], acc[0][r][1]);
      }
    }
  }
  if (!grouped_epilogue) {
    finish_tile<MR>(p, pp, m0, total);
    return;
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) finish_row(p, m0 + r, pp.n0, pp.nvalid, y[r][0], y[r][1]);
}

OSENGINE_AVX512_VNNI void run_tile(const W4Context& c, const PanelParams& pp, const std::int32_t* colsum,
                                   std::int64_t m0, std::int64_t rows) {
  switch (rows) {
    case 1: return w4_tile<1>(c, pp, colsum, m0);
    case 2: return w4_tile<2>(c, pp, colsum, m0);
    case 3: return w4_tile<3>(c, pp, colsum, m0);
    case 4: return w4_tile<4>(c, pp, colsum, m0);
    case 5: return w4_tile<5>(c, pp, colsum, m0);
    default: return w4_tile<6>(c, pp, colsum, m0);
  }
}

}  // namespace

void gemm_w4_avx512_vnni(const GemmProblem& p) { run_w4(p, kMR, run_tile); }

}  // namespace osengine::detail
