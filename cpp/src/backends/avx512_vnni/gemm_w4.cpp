// AVX-512 VNNI W4 GEMM (int4 weights: W4A8, W4A4) with the fused OS+ epilogue; bit-identical to the reference
// backend. The AVX2 backend's arithmetic (backends/avx2/gemm_w4.cpp: biased weights u = w + 8 in [0, 15] as the
// unsigned operand, the activation codes as the signed one,
//     sum_k (a - zp) w = sum_k a u - 8 * rowsum(a) - zp * colsum(w)      per group, int32, exact)
// with the products added by vpdpbusd straight into int32 lanes: no int16 sums to flush.
//
// Layout (pack.cpp): panels of 16 output channels; K padded per group to a multiple of 8 (weight 0, nibble 8); one
// step of 8 k is 64 bytes, byte 8c + j (c in 0..7, j in 0..7) holding k = 8s + j of column c in its low nibble and
// of column c + 8 in its high nibble. As int32 lanes: lane 2c holds k 8s .. 8s+3 of column c, lane 2c + 1 holds
// 8s+4 .. 8s+7. A 64-bit broadcast of the row's eight activation bytes (vpbroadcastq) puts a[8s .. 8s+3] in the
// even lanes and a[8s+4 .. 8s+7] in the odd ones, so one vpdpbusd on the low nibbles (columns 0..7) and one on the
// high nibbles (columns 8..15) do 128 MACs per step and row; at the end of a group each column's two lanes are
// added (two vpermt2d and one vpaddd per row). Groups are folded into fp32 rows in zmm, and the tile ends in the
// AVX2 backend's epilogue (tile_common.hpp).
// Tiles of up to kMR rows x 16 columns (2 zmm accumulators per row); decode (one row) runs two chains over
// consecutive steps so that the vpdpbusd latency overlaps.
#include <cstring>

#include "backends/avx512_vnni/tile_common.hpp"

namespace osengine::detail {

namespace {

using namespace avx2_gemm;

constexpr int kMR = 8;
constexpr std::int64_t kStepK = 8, kStepBytes = 64;

// acc[r][h] += the products of step s with row r of a (h = 0: columns 0..7, h = 1: columns 8..15, in lane pairs).
template <int MR>
OSENGINE_AVX512_VNNI inline void w4_step(const std::int8_t* a, std::int64_t lda, const std::uint8_t* w,
                                         std::int64_t s, __m512i (&acc)[MR][2]) {
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const __m512i v = _mm512_loadu_si512(w + s * kStepBytes);
  const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    std::int64_t eight;
    std::memcpy(&eight, a + r * lda + s * kStepK, sizeof eight);
    const __m512i b = _mm512_set1_epi64(eight);
    vnni::dpbusd(acc[r][0], lo, b);
    vnni::dpbusd(acc[r][1], hi, b);
  }
}

// The 16 column sums of one row, in column order, from its lane-pair accumulators.
OSENGINE_AVX512_VNNI inline __m512i column_sums_of(const __m512i (&acc)[2]) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_epi32(_mm512_permutex2var_epi32(acc[0], even, acc[1]),
                          _mm512_permutex2var_epi32(acc[0], odd, acc[1]));
}

template <int MR>
OSENGINE_AVX512_VNNI void w4_tile(const W4Context& c, const PanelParams& pp, const std::int32_t* colsum,
                                  std::int64_t m0) {
  constexpr int kChains = MR == 1 ? 2 : 1;
  const GemmProblem& p = *c.p;
  const std::int64_t lda = c.shape.padded_k(), group_steps = c.shape.group_steps(), groups = c.shape.groups;
  const std::int8_t* a = c.a + m0 * lda;
  const std::uint8_t* w = c.w + (pp.n0 / kNR) * c.shape.steps() * kStepBytes;
  const bool with_zp = p.a_zero_point != nullptr && p.out_accumulators == nullptr;
  vnni::TileEnd<MR> end(p, pp, m0, groups);
  for (std::int64_t g = 0; g < groups; ++g) {
    __m512i acc[kChains][MR][2];
#pragma GCC unroll 2
    for (int ch = 0; ch < kChains; ++ch)
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[ch][r][0] = acc[ch][r][1] = _mm512_setzero_si512();
    const std::int64_t s_end = (g + 1) * group_steps;
    std::int64_t s = g * group_steps;
    for (; s + kChains <= s_end; s += kChains) {
      // Decode (one row) streams W from memory once: fetch 4 KB ahead, every 64-byte line (a step is one line).
      if constexpr (MR == 1)
#pragma GCC unroll 2
        for (int ch = 0; ch < kChains; ++ch)
          _mm_prefetch(reinterpret_cast<const char*>(w + (s + 64 + ch) * kStepBytes), _MM_HINT_T0);
#pragma GCC unroll 2
      for (int ch = 0; ch < kChains; ++ch) w4_step<MR>(a, lda, w, s + ch, acc[ch]);
    }
    for (; s < s_end; ++s) w4_step<MR>(a, lda, w, s, acc[0]);
#pragma GCC unroll 2
    for (int ch = 1; ch < kChains; ++ch)
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        acc[0][r][0] = _mm512_add_epi32(acc[0][r][0], acc[ch][r][0]);
        acc[0][r][1] = _mm512_add_epi32(acc[0][r][1], acc[ch][r][1]);
      }
    // sum (a - zp) w = sum a u - 8 rowsum(a) - zp colsum(w)   (colsum: with a zero point only)
    __m512i sums[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      __m512i sum = _mm512_sub_epi32(column_sums_of(acc[0][r]), _mm512_set1_epi32(8 * c.rowsum[(m0 + r) * groups + g]));
      if (with_zp) {
        const __m512i zp = _mm512_set1_epi32(p.a_zero_point[(m0 + r) * p.a_scale_stride_m + g * p.a_scale_stride_g]);
        sum = _mm512_sub_epi32(sum, _mm512_mullo_epi32(zp, _mm512_loadu_si512(colsum + g * kNR)));
      }
      sums[r] = sum;
    }
    end.add_group(g, sums);
  }
  end.finish();
}

OSENGINE_AVX512_VNNI void run_tile(const W4Context& c, const PanelParams& pp, const std::int32_t* colsum,
                                   std::int64_t m0, std::int64_t rows) {
  switch (rows) {
    case 1: return w4_tile<1>(c, pp, colsum, m0);
    case 2: return w4_tile<2>(c, pp, colsum, m0);
    case 3: return w4_tile<3>(c, pp, colsum, m0);
    case 4: return w4_tile<4>(c, pp, colsum, m0);
    case 5: return w4_tile<5>(c, pp, colsum, m0);
    case 6: return w4_tile<6>(c, pp, colsum, m0);
    case 7: return w4_tile<7>(c, pp, colsum, m0);
    default: return w4_tile<8>(c, pp, colsum, m0);
  }
}

}  // namespace

void gemm_w4_avx512_vnni(const GemmProblem& p) { run_w4(p, kMR, kStepK, run_tile); }

}  // namespace osengine::detail
