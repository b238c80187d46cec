// AVX-512 VNNI W8 GEMM (int8 weights: W8A8) with the fused OS+ epilogue; bit-identical to the reference backend.
//
// Products: vpdpbusd multiplies unsigned bytes by signed bytes and adds each group of four products into an int32
//   lane (no saturation; wrapping int32 sums). The activation codes are made unsigned by a bias, u = a + 128 in
//   [0, 255], and the weights stay signed:
//       sum_k (a - zp) w = sum_k u w - (128 + zp) * colsum(w)       (per group, in int32 arithmetic)
//   The true value fits int32 (as the reference's accumulator does), so the wrapping arithmetic gives it exactly.
//   colsum is what PackedWeights keeps ([groups, N]); without an activation zero point zp = 0.
// Layout (pack.cpp): panels of 16 output channels; K padded per group to a multiple of 4 (zero weights); one step
//   (4 k) of a panel is 64 bytes, column c's four weights in bytes 4c .. 4c+3: one zmm whose int32 lane c meets a
//   32-bit broadcast of the row's four activation bytes.
// A is prepared once per call: u8 [M, padded_k], the same per-group padding (any value: its weights are 0).
// Tiles of up to kMR rows x 16 columns, one zmm accumulator per row (decode: four chains over consecutive steps, so
//   that the 5-cycle vpdpbusd latency overlaps). Groups are folded into fp32 rows in zmm, and the tile ends in the
//   AVX2 backend's epilogue (tile_common.hpp).
#include <cstring>

#include "backends/avx512_vnni/tile_common.hpp"

namespace osengine::detail {

namespace {

using namespace avx2_gemm;

constexpr int kMR = 8;  // rows per tile
constexpr std::int64_t kStepBytes = 64;

struct W8Context {
  const GemmProblem* p = nullptr;
  W4Shape shape;                     // groups padded to a multiple of 4 k (step_k 4)
  const std::uint8_t* a = nullptr;   // prepared A, u8 [M, padded_k]
  const std::uint8_t* w = nullptr;
};

// acc[r] += the products of step s (4 k) of the panel w with row r of a.
template <int MR>
OSENGINE_AVX512_VNNI inline void w8_step(const std::uint8_t* a, std::int64_t lda, const std::uint8_t* w, std::int64_t s,
                                         __m512i (&acc)[MR]) {
  const __m512i wv = _mm512_loadu_si512(w + s * kStepBytes);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    std::int32_t four;
    std::memcpy(&four, a + r * lda + s * 4, sizeof four);
    vnni::dpbusd(acc[r], _mm512_set1_epi32(four), wv);
  }
}

template <int MR>
OSENGINE_AVX512_VNNI void w8_tile(const W8Context& c, const PanelParams& pp, const std::int32_t* colsum,
                                  std::int64_t m0) {
  constexpr int kChains = MR == 1 ? 4 : 1;
  const GemmProblem& p = *c.p;
  const std::int64_t lda = c.shape.padded_k(), group_steps = c.shape.group_steps(), groups = c.shape.groups;
  const std::uint8_t* a = c.a + m0 * lda;
  const std::uint8_t* w = c.w + (pp.n0 / kNR) * c.shape.steps() * kStepBytes;
  const bool with_zp = p.out_accumulators == nullptr && p.a_zero_point != nullptr;
  vnni::TileEnd<MR> end(p, pp, m0, groups);
  for (std::int64_t g = 0; g < groups; ++g) {
    __m512i acc[kChains][MR];
#pragma GCC unroll 4
    for (int ch = 0; ch < kChains; ++ch)
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[ch][r] = _mm512_setzero_si512();
    const std::int64_t s_end = (g + 1) * group_steps;
    std::int64_t s = g * group_steps;
    for (; s + kChains <= s_end; s += kChains) {
      // Decode (one row) streams W from memory once: fetch 4 KB ahead, every 64-byte line (a step is one line).
      if constexpr (MR == 1)
#pragma GCC unroll 4
        for (int ch = 0; ch < kChains; ++ch)
          _mm_prefetch(reinterpret_cast<const char*>(w + (s + 64 + ch) * kStepBytes), _MM_HINT_T0);
#pragma GCC unroll 4
      for (int ch = 0; ch < kChains; ++ch) w8_step<MR>(a, lda, w, s + ch, acc[ch]);
    }
    for (; s < s_end; ++s) w8_step<MR>(a, lda, w, s, acc[0]);
#pragma GCC unroll 4
    for (int ch = 1; ch < kChains; ++ch)
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[0][r] = _mm512_add_epi32(acc[0][r], acc[ch][r]);
    // sum (a - zp) w = sum u w - (128 + zp) colsum(w)
    const __m512i cs = _mm512_loadu_si512(colsum + g * kNR);
    __m512i sums[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const std::int32_t zp = with_zp ? p.a_zero_point[(m0 + r) * p.a_scale_stride_m + g * p.a_scale_stride_g] : 0;
      sums[r] = _mm512_sub_epi32(acc[0][r], _mm512_mullo_epi32(_mm512_set1_epi32(128 + zp), cs));
    }
    end.add_group(g, sums);
  }
  end.finish();
}

OSENGINE_AVX512_VNNI void run_tile(const W8Context& c, const PanelParams& pp, const std::int32_t* colsum,
                                   std::int64_t m0, std::int64_t rows) {
  switch (rows) {
    case 1: return w8_tile<1>(c, pp, colsum, m0);
    case 2: return w8_tile<2>(c, pp, colsum, m0);
    case 3: return w8_tile<3>(c, pp, colsum, m0);
    case 4: return w8_tile<4>(c, pp, colsum, m0);
    case 5: return w8_tile<5>(c, pp, colsum, m0);
    case 6: return w8_tile<6>(c, pp, colsum, m0);
    case 7: return w8_tile<7>(c, pp, colsum, m0);
    default: return w8_tile<8>(c, pp, colsum, m0);
  }
}

// A: u = a + 128 as bytes [M, padded_k] (int4-packed codes unpacked first), padded per group with 128.
void prepare_rows(const GemmProblem& p, const W4Shape& shape, std::uint8_t* out, std::int64_t r0, std::int64_t r1) {
  const std::int64_t k = p.k, gs = shape.group_size, lda = shape.padded_k();
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  for (std::int64_t m = r0; m < r1; ++m) {
    for (std::int64_t g = 0; g < shape.groups; ++g) {
      std::uint8_t* dst = out + m * lda + g * shape.group_k;
      if (p.a_format == ActivationFormat::int8) {
        const std::int8_t* src = p.a + m * k + g * gs;
        std::int64_t i = 0;
        for (; i + 32 <= gs; i += 32)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                              _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)), bias));
        for (; i < gs; ++i) dst[i] = static_cast<std::uint8_t>(src[i] + 128);
      } else {  // int4 packed two per byte, low nibble = even k; gs is even
        const auto* src = reinterpret_cast<const std::uint8_t*>(p.a) + m * (k / 2) + g * gs / 2;
        for (std::int64_t i = 0; i < gs / 2; ++i) {
          const int lo = src[i] & 0x0f, hi = src[i] >> 4;
          dst[2 * i] = static_cast<std::uint8_t>((lo >= 8 ? lo - 16 : lo) + 128);
          dst[2 * i + 1] = static_cast<std::uint8_t>((hi >= 8 ? hi - 16 : hi) + 128);
        }
      }
      for (std::int64_t i = gs; i < shape.group_k; ++i) dst[i] = 128;
    }
  }
}

// The panel's column sums [groups][16] (padding columns 0), which every tile needs for the +128 bias.
void prepare_colsum(const W8Context& c, std::int64_t panel, std::int64_t nvalid, std::vector<std::int32_t>& colsum) {
  const std::vector<std::int32_t>& sums = c.p->weights->column_sums();  // [groups, N]
  colsum.assign(static_cast<std::size_t>(c.shape.groups * kNR), 0);
  for (std::int64_t g = 0; g < c.shape.groups; ++g)
    for (std::int64_t col = 0; col < nvalid; ++col) colsum[g * kNR + col] = sums[g * c.p->n + panel * kNR + col];
}

}  // namespace

void gemm_w8_avx512_vnni(const GemmProblem& p) {
  const PackedWeights& w = *p.weights;
  W8Context c;
  c.p = &p;
  c.shape = w4_shape(p.k, w.group_size());
  c.w = w.data();
  const std::int64_t lda = c.shape.padded_k();
  thread_local std::vector<std::uint8_t> a_rows;
  if (a_rows.size() < static_cast<std::size_t>(p.m * lda)) a_rows.resize(static_cast<std::size_t>(p.m * lda));
  c.a = a_rows.data();
  std::uint8_t* a_out = a_rows.data();
  parallel_for(p.m, std::max<std::int64_t>(1, 65536 / std::max<std::int64_t>(1, p.k)),
               [&](std::int64_t r0, std::int64_t r1) { prepare_rows(p, c.shape, a_out, r0, r1); });
  run_blocks(p, kMR, lda, lda, [&] {
    return [&c, &p, pp = PanelParams{}, colsum = std::vector<std::int32_t>{}, current = std::int64_t{-1}](
               std::int64_t panel, std::int64_t m_begin, std::int64_t m_end) mutable {
      if (panel != current) {
        if (!p.out_accumulators) {
          Context ctx;
          ctx.p = &p;
          ctx.groups = c.shape.groups;
          prepare_panel(ctx, panel, pp);
        }
        pp.n0 = panel * kNR;
        pp.nvalid = std::min<std::int64_t>(kNR, p.n - pp.n0);
        prepare_colsum(c, panel, pp.nvalid, colsum);
        current = panel;
      }
      for (std::int64_t m0 = m_begin; m0 < m_end; m0 += kMR)
        run_tile(c, pp, colsum.data(), m0, std::min<std::int64_t>(kMR, m_end - m0));
    };
  });
}

}  // namespace osengine::detail
