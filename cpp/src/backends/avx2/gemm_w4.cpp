// AVX2 W4 GEMM (int4 weights: W4A8, W4A4) with the fused OS+ epilogue; bit-identical to the reference backend.
#include "backends/avx2/gemm_common.hpp"

namespace osengine::detail {

namespace {

using namespace avx2_gemm;

// ---------------------------------------------------------------------------------------------------------------
// W4 (W4A8, W4A4): vpmaddubsw with int16 accumulation.
//   int4 weights are stored biased, u = w + 8 in [0, 15], and are the unsigned operand of vpmaddubsw; the int8 (or
//   int4) activation codes a are the signed one. Each int16 lane gets u[k] a[k] + u[k+1] a[k+1], at most
//   2 * 15 * 128 = 3840 in magnitude (no saturation), and kW4Flush = 8 such steps are summed with vpaddw before a
//   vpmaddwd(x, 1) widens them into the int32 accumulators: 8 * 3840 = 30720 < 32767, exact. Then
//       sum_k (a - zp) w = sum_k a u - 8 * rowsum(a) - zp * colsum(w)          (per group; all int32, exact)
//   with rowsum(a) computed when A is prepared and colsum(w) kept by PackedWeights. 64 MACs per two vpmaddubsw
//   (one multiply-pipe op each) plus a vpmaddwd every 8 steps: about twice the rate of the int16 scheme above.
// Layout: K is padded per group to a multiple of 4 (group_k), so that a step of 4 k never straddles a group. Panels
//   of 16 output channels; one step (4 k) of a panel is 32 bytes: byte 4c + j holds, for k = 4s + j, column c in
//   its low nibble and column c + 8 in its high nibble. One 32-bit broadcast of A (a[4s .. 4s+3]) then meets each
//   column's four weights in its 32-bit lane; the two vpmaddubsw (low nibbles, high nibbles) give columns 0..7 and
//   8..15, each as two int16 pair sums per column, and vpmaddwd(x, 1) adds the pair into the column's int32 lane.
// Tiles of up to 4 rows x 16 columns (8 int16 + the W and broadcast registers; the int32 sums are touched once
// every 8 steps).
constexpr int kW4MR = 4;
constexpr std::int64_t kW4Flush = 8;

template <int MR>
void w4_tile(const W4Context& c, const PanelParams& pp, const std::int32_t* colsum, std::int64_t m0) {
  constexpr int kChains = MR == 1 ? 2 : 1;
  const GemmProblem& p = *c.p;
  const std::int64_t lda = c.shape.padded_k(), group_steps = c.shape.group_steps(), groups = c.shape.groups;
  const std::int8_t* a = c.a + m0 * lda;
  const std::uint8_t* w = c.w + (pp.n0 / kNR) * c.shape.steps() * 32;
  const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const bool with_zp = p.a_zero_point != nullptr && p.out_accumulators == nullptr;
  __m256i total[MR][2];
  __m256 y[MR][2];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    total[r][0] = total[r][1] = _mm256_setzero_si256();
    y[r][0] = y[r][1] = _mm256_setzero_ps();
  }
  if (!p.out_accumulators && groups > 1) {  // grouped epilogue: y starts from the bias, one fma per group
    const __m256 b0 = _mm256_loadu_ps(pp.bias.data()), b1 = _mm256_loadu_ps(pp.bias.data() + 8);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      y[r][0] = b0;
      y[r][1] = b1;
    }
  }
  for (std::int64_t g = 0; g < groups; ++g) {
    __m256i acc[MR][2];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const std::int64_t s_end = (g + 1) * group_steps;
    for (std::int64_t s = g * group_steps; s < s_end; s += kW4Flush) {
      const std::int64_t t_end = std::min(s_end, s + kW4Flush);
      // Each int16 sum is one vpmaddubsw -> vpaddw chain (~4 cycles a step); with few rows, consecutive steps go to
      // separate chains so that the multiplies overlap. The chains share the kW4Flush budget: exact when added.
      __m256i h[kChains][MR][2];
#pragma GCC unroll 4
      for (int ch = 0; ch < kChains; ++ch)
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) h[ch][r][0] = h[ch][r][1] = _mm256_setzero_si256();
      auto step = [&](std::int64_t t, __m256i (&hc)[MR][2]) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + t * 32));
        const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          std::int32_t four;
          std::memcpy(&four, a + r * lda + t * 4, sizeof four);
          const __m256i b = _mm256_set1_epi32(four);
          hc[r][0] = _mm256_add_epi16(hc[r][0], _mm256_maddubs_epi16(lo, b));
          hc[r][1] = _mm256_add_epi16(hc[r][1], _mm256_maddubs_epi16(hi, b));
        }
      };
      std::int64_t t = s;
      for (; t + kChains <= t_end; t += kChains) {
        // Decode (one row) streams W from memory once: fetch 4 KB ahead, one request per 64-byte line.
        if constexpr (MR == 1) _mm_prefetch(reinterpret_cast<const char*>(w + (t + 128) * 32), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int ch = 0; ch < kChains; ++ch) step(t + ch, h[ch]);
      }
      for (; t < t_end; ++t) step(t, h[0]);
#pragma GCC unroll 4
      for (int ch = 1; ch < kChains; ++ch)
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          h[0][r][0] = _mm256_add_epi16(h[0][r][0], h[ch][r][0]);
          h[0][r][1] = _mm256_add_epi16(h[0][r][1], h[ch][r][1]);
        }
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(h[0][r][0], ones));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(h[0][r][1], ones));
      }
    }
    // sum (a - zp) w = sum a u - 8 rowsum(a) - zp colsum(w)   (colsum: with a zero point only)
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256i bias8 = _mm256_set1_epi32(8 * c.rowsum[(m0 + r) * groups + g]);
      acc[r][0] = _mm256_sub_epi32(acc[r][0], bias8);
      acc[r][1] = _mm256_sub_epi32(acc[r][1], bias8);
      if (with_zp) {
        const __m256i cs0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + g * kNR));
        const __m256i cs1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + g * kNR + 8));
        const __m256i zp = _mm256_set1_epi32(p.a_zero_point[(m0 + r) * p.a_scale_stride_m + g * p.a_scale_stride_g]);
        acc[r][0] = _mm256_sub_epi32(acc[r][0], _mm256_mullo_epi32(zp, cs0));
        acc[r][1] = _mm256_sub_epi32(acc[r][1], _mm256_mullo_epi32(zp, cs1));
      }
    }
    if (p.out_accumulators || groups == 1) {
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        total[r][0] = _mm256_add_epi32(total[r][0], acc[r][0]);
        total[r][1] = _mm256_add_epi32(total[r][1], acc[r][1]);
      }
    } else {
      fold_group<MR>(p, pp, m0, g, acc, y);
    }
  }
  if (p.out_accumulators || groups == 1) {
    finish_tile<MR>(p, pp, m0, total);
    return;
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) finish_row(p, m0 + r, pp.n0, pp.nvalid, y[r][0], y[r][1]);
}

void run_w4_tile(const W4Context& c, const PanelParams& pp, const std::int32_t* colsum, std::int64_t m0,
                 std::int64_t rows) {
  switch (rows) {
    case 1: return w4_tile<1>(c, pp, colsum, m0);
    case 2: return w4_tile<2>(c, pp, colsum, m0);
    case 3: return w4_tile<3>(c, pp, colsum, m0);
    default: return w4_tile<4>(c, pp, colsum, m0);
  }
}

}  // namespace

void gemm_w4_avx2(const GemmProblem& p) { run_w4(p, kW4MR, 4, run_w4_tile); }

}  // namespace osengine::detail
