// AVX2 W8 GEMM (int8 weights: W8A8) with the fused OS+ epilogue; bit-identical to the reference backend. Exact
// integer products without VNNI (no vpdpbusd); the W4 scheme is in gemm_w4.cpp, the shared parts in gemm_common.hpp.
//
// W8 (W8A8): every product is computed with vpmaddwd on int16 operands: both A and W codes are sign-extended to
//   int16 and vpmaddwd multiplies 16 int16 pairs and adds adjacent products into 8 int32 lanes. |a| <= 128 and
//   |w| <= 127, so each lane gets at most 2 * 128 * 127 = 32512 in magnitude (2 * 255 * 127 with a folded zero
//   point, see widen_rows): vpmaddwd never saturates and the int32 sums over K <= 65536 are exact.
//   We considered the vpmaddubsw "sign trick" (u8 = |a| via vpsignb(a, a), s8 = vpsignb(w, a): pair sums bounded
//   by 2 * 128 * 127 = 32512 < 32767, exact) but two such int16 sums cannot be added without overflow, so each
//   vpmaddubsw still needs a vpmaddwd(x, 1) to widen it: 32 MACs per 2 multiply-pipe ops either way, and the int16
//   scheme needs no vpsignb. FBGEMM's vpmaddubsw + vpmaddwd(x, 1) mix (one add per 32 MACs) is exact only for
//   7-bit activations. benchmarks/cpu_peak.cpp measures the ceilings of all three instruction mixes.
// W4 (W4A8, W4A4): weights in [-8, 7] make int16 accumulation possible: vpmaddubsw of biased weights (w + 8, the
//   unsigned operand) and the activation codes, summed over 8 steps in int16, then widened (see "W4 kernels").
//
// W8 layouts:
//   A (activations) is widened per call into a per-thread int16 buffer, row-major [M, Kp] (Kp = K rounded up to
//   even, zero-padded), so one 32-bit broadcast (vpbroadcastd) gives the pair (a[k], a[k+1]) in every lane.
//   W8: panels of 16 output channels. For each k-pair step s of a panel, 32 bytes: bytes 0..15 hold columns 0..7
//   as (w[c][2s], w[c][2s+1]) pairs, bytes 16..31 columns 8..15, so vpmovsxbw of each 16-byte half gives the int16
//   operand of one vpmaddwd against the broadcast A pair. N is padded to 16 and K to even with zeros.
//
// W8 microkernel: MR x 16 outputs (MR <= 6 rows, 2 ymm of 8 int32 per row: 12 accumulators + 2 W + 1 A broadcast
//   = 15 ymm registers). Per k-pair step: 2 W loads (sign-extended), MR broadcasts, 2*MR vpmaddwd and 2*MR vpaddd.
//   The full K range of a group (all of K without groups) runs in registers; the epilogue is applied on the
//   register tile: c = acc - zp * colsum (int32; the zero point is folded into the widened A, see widen_rows),
//   y = fma(float(c), a_scale * w_scale, y) per group in group order starting from bias (with groups the 6-row
//   kernel folds each group into the fp32 tile itself, in asm), then the activation (AVX2 mirrors of
//   core/float_math.hpp), + residual, store fp32 or bf16 (round to nearest even, as float_to_bf16).
#include "backends/avx2/gemm_common.hpp"

namespace osengine::detail {

namespace {

using namespace avx2_gemm;

constexpr int kMR = 6;  // rows per microkernel tile

// ---------------------------------------------------------------------------------------------------------------
// W8 loads: two int16 vectors (columns 0..7 and 8..15, each as k pairs) of one step.
constexpr std::int64_t kW8StepBytes = 32;

inline void load_w8(const std::uint8_t* w, __m256i& w0, __m256i& w1) {
  w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
}

// acc[r][h] += sum over steps [s0, s1) of A row r (int16 pairs, one int32 per step) x W vector h.
template <int MR>
inline void accumulate(const std::int32_t* a, std::int64_t lda, const std::uint8_t* w, std::int64_t s0,
                       std::int64_t s1, __m256i (&acc)[MR][2]) {
  constexpr std::int64_t sb = kW8StepBytes;
  const std::int32_t* ar[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) ar[r] = a + r * lda;
  std::int64_t s = s0;
  if constexpr (MR == 1) {
    // Decode (M = 1) streams W once: two steps per iteration, two accumulator pairs, prefetch ahead.
    __m256i x0 = _mm256_setzero_si256(), x1 = _mm256_setzero_si256();
    for (; s + 2 <= s1; s += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (s + 128) * sb), _MM_HINT_T0);  // 4 KB ahead
      __m256i w0, w1, w2, w3;
      load_w8(w + s * sb, w0, w1);
      load_w8(w + (s + 1) * sb, w2, w3);
      const __m256i av = _mm256_set1_epi32(ar[0][s]), bv = _mm256_set1_epi32(ar[0][s + 1]);
      acc[0][0] = _mm256_add_epi32(acc[0][0], _mm256_madd_epi16(av, w0));
      acc[0][1] = _mm256_add_epi32(acc[0][1], _mm256_madd_epi16(av, w1));
      x0 = _mm256_add_epi32(x0, _mm256_madd_epi16(bv, w2));
      x1 = _mm256_add_epi32(x1, _mm256_madd_epi16(bv, w3));
    }
    acc[0][0] = _mm256_add_epi32(acc[0][0], x0);
    acc[0][1] = _mm256_add_epi32(acc[0][1], x1);
  }
  for (; s < s1; ++s) {
    __m256i w0, w1;
    load_w8(w + s * sb, w0, w1);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256i av = _mm256_set1_epi32(ar[r][s]);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(av, w0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(av, w1));
    }
  }
}


// The 6 x 16 microkernel in inline asm: GCC does not keep 12 accumulators + 2 W + broadcast + product (16 ymm)
// in registers and spills. Fixed assignment: ymm0..11 accumulators (row r: ymm2r, ymm2r+1), ymm12/13 W,
// ymm14 A broadcast, ymm15 product. Two k-pair steps per iteration. Writes the int32 tile out[6][16].
#define OSE_W8_LOAD(off)                    \
  "vpmovsxbw " #off "(%[w]), %%ymm12\n\t"  \
  "vpmovsxbw " #off "+16(%[w]), %%ymm13\n\t"
#define OSE_ROW(src, acc0, acc1)                   \
  "vpbroadcastd " src ", %%ymm14\n\t"              \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"         \
  "vpaddd %%ymm15, %%ymm" #acc0 ", %%ymm" #acc0 "\n\t" \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"         \
  "vpaddd %%ymm15, %%ymm" #acc1 ", %%ymm" #acc1 "\n\t"
#define OSE_STEP(LOAD, woff, aoff)                              \
  LOAD(woff)                                                    \
  OSE_ROW(#aoff "(%[a0])", 0, 1)                                \
  OSE_ROW(#aoff "(%[a0],%[lda],1)", 2, 3)                       \
  OSE_ROW(#aoff "(%[a0],%[lda],2)", 4, 5)                       \
  OSE_ROW(#aoff "(%[a3])", 6, 7)                                \
  OSE_ROW(#aoff "(%[a3],%[lda],1)", 8, 9)                       \
  OSE_ROW(#aoff "(%[a3],%[lda],2)", 10, 11)

#define OSE_KERNEL_6x16(LOAD, SB, TAIL, ...)                                                           \
  asm volatile(                                                                                        \
      "vpxor %%xmm0, %%xmm0, %%xmm0\n\t"                                                               \
      "vpxor %%xmm1, %%xmm1, %%xmm1\n\t"                                                               \
      "vpxor %%xmm2, %%xmm2, %%xmm2\n\t"                                                               \
      "vpxor %%xmm3, %%xmm3, %%xmm3\n\t"                                                               \
      "vpxor %%xmm4, %%xmm4, %%xmm4\n\t"                                                               \
      "vpxor %%xmm5, %%xmm5, %%xmm5\n\t"                                                               \
      "vpxor %%xmm6, %%xmm6, %%xmm6\n\t"                                                               \
      "vpxor %%xmm7, %%xmm7, %%xmm7\n\t"                                                               \
      "vpxor %%xmm8, %%xmm8, %%xmm8\n\t"                                                               \
      "vpxor %%xmm9, %%xmm9, %%xmm9\n\t"                                                               \
      "vpxor %%xmm10, %%xmm10, %%xmm10\n\t"                                                            \
      "vpxor %%xmm11, %%xmm11, %%xmm11\n\t"                                                            \
      "cmp $2, %[n]\n\t"                                                                               \
      "jl 2f\n\t"                                                                                      \
      ".p2align 5\n"                                                                                   \
      "1:\n\t" OSE_STEP(LOAD, 0, 0) OSE_STEP(LOAD, SB, 4)                                              \
      "add $8, %[a0]\n\t"                                                                              \
      "add $8, %[a3]\n\t"                                                                              \
      "add $2*" #SB ", %[w]\n\t"                                                                       \
      "sub $2, %[n]\n\t"                                                                               \
      "cmp $2, %[n]\n\t"                                                                               \
      "jge 1b\n"                                                                                       \
      "2:\n\t"                                                                                         \
      "test %[n], %[n]\n\t"                                                                            \
      "jz 3f\n\t" OSE_STEP(LOAD, 0, 0) "3:\n\t" TAIL                                                  \
      : [a0] "+r"(a0), [a3] "+r"(a3), [w] "+r"(wp), [n] "+r"(n)                                        \
      : [lda] "r"(lda_bytes), __VA_ARGS__                                                              \
      : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15")

// Tail 1: store the int32 tile to out[6][16].
#define OSE_STORE_ROW(r, a0, a1) "vmovdqu %%ymm" #a0 ", 64*" #r "(%[out])\n\t" "vmovdqu %%ymm" #a1 ", 64*" #r "+32(%[out])\n\t"
#define OSE_TAIL_STORE                                                                                   \
  OSE_STORE_ROW(0, 0, 1) OSE_STORE_ROW(1, 2, 3) OSE_STORE_ROW(2, 4, 5) OSE_STORE_ROW(3, 6, 7)            \
  OSE_STORE_ROW(4, 8, 9) OSE_STORE_ROW(5, 10, 11)
// Tail 2: fold one group into the fp32 tile y[6][16]: y = fma(float(acc), a_scale[r] * w_scale[c], y), the
// reference's operation and order (fma(x, s, y) with s = a_scale * w_scale; the product commutes exactly).
#define OSE_FOLD_HALF(r, acc, wreg, off)                                  \
  "vmulps %%ymm" #wreg ", %%ymm14, %%ymm15\n\t"                         \
  "vcvtdq2ps %%ymm" #acc ", %%ymm" #acc "\n\t"                          \
  "vfmadd213ps 64*" #r "+" #off "(%[y]), %%ymm15, %%ymm" #acc "\n\t"    \
  "vmovups %%ymm" #acc ", 64*" #r "+" #off "(%[y])\n\t"
#define OSE_FOLD_ROW(r, a0, a1)                        \
  "vbroadcastss 4*" #r "(%[as]), %%ymm14\n\t"        \
  OSE_FOLD_HALF(r, a0, 12, 0) OSE_FOLD_HALF(r, a1, 13, 32)
#define OSE_TAIL_FOLD                                                                                   \
  "vmovups (%[ws]), %%ymm12\n\t"                                                                      \
  "vmovups 32(%[ws]), %%ymm13\n\t"                                                                    \
  OSE_FOLD_ROW(0, 0, 1) OSE_FOLD_ROW(1, 2, 3) OSE_FOLD_ROW(2, 4, 5) OSE_FOLD_ROW(3, 6, 7)              \
  OSE_FOLD_ROW(4, 8, 9) OSE_FOLD_ROW(5, 10, 11)

void kernel_6x16(const std::int32_t* a, std::int64_t lda, const std::uint8_t* w, std::int64_t s0, std::int64_t s1,
                 std::int32_t* out) {
  const std::int32_t* a0 = a + s0;
  const std::int32_t* a3 = a + 3 * lda + s0;
  const std::uint8_t* wp = w + s0 * kW8StepBytes;
  std::int64_t n = s1 - s0;
  const std::int64_t lda_bytes = lda * 4;
  OSE_KERNEL_6x16(OSE_W8_LOAD, 32, OSE_TAIL_STORE, [out] "r"(out));
}

// Accumulates steps [s0, s1) (one group) and folds it into y[6][16] with the scales ws[16] and as[6].
void kernel_6x16_fold(const std::int32_t* a, std::int64_t lda, const std::uint8_t* w, std::int64_t s0, std::int64_t s1,
                      const float* ws, const float* as, float* y) {
  const std::int32_t* a0 = a + s0;
  const std::int32_t* a3 = a + 3 * lda + s0;
  const std::uint8_t* wp = w + s0 * kW8StepBytes;
  std::int64_t n = s1 - s0;
  const std::int64_t lda_bytes = lda * 4;
  OSE_KERNEL_6x16(OSE_W8_LOAD, 32, OSE_TAIL_FOLD, [ws] "r"(ws), [as] "r"(as), [y] "r"(y));
}

// Generic MR rows: the 6-row case goes through the asm kernel and an int32 tile in memory.
template <int MR>
inline void accumulate_tile(const std::int32_t* a, std::int64_t lda, const std::uint8_t* w, std::int64_t s0,
                            std::int64_t s1, __m256i (&acc)[MR][2]) {
  if constexpr (MR == 6) {
    alignas(32) std::int32_t out[6][16];
    kernel_6x16(a, lda, w, s0, s1, &out[0][0]);
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = _mm256_load_si256(reinterpret_cast<const __m256i*>(out[r]));
      acc[r][1] = _mm256_load_si256(reinterpret_cast<const __m256i*>(out[r] + 8));
    }
  } else {
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    accumulate<MR>(a, lda, w, s0, s1, acc);
  }
}

// One MR x 16 tile: rows m0 .. m0 + MR of panel pp.
template <int MR>
void tile(const Context& ctx, const PanelParams& pp, std::int64_t m0) {
  const GemmProblem& p = *ctx.p;
  const std::int32_t* a = ctx.a16 + m0 * ctx.steps;
  const std::uint8_t* w = ctx.w + (pp.n0 / kNR) * ctx.steps * kW8StepBytes;
  __m256i acc[MR][2];
  if (p.out_accumulators || ctx.groups == 1) {
    accumulate_tile<MR>(a, ctx.steps, w, 0, ctx.steps, acc);
    finish_tile<MR>(p, pp, m0, acc);
    return;
  }
  // Grouped: the float tile lives in memory between groups, the int32 accumulators in registers.
  alignas(32) float ybuf[MR][2][8];
  const __m256 b0 = _mm256_loadu_ps(pp.bias.data()), b1 = _mm256_loadu_ps(pp.bias.data() + 8);
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(ybuf[r][0], b0);
    _mm256_store_ps(ybuf[r][1], b1);
  }
  if constexpr (MR == 6) {
    for (std::int64_t g = 0; g < ctx.groups; ++g) {
      alignas(16) float as[6];
      for (int r = 0; r < 6; ++r) as[r] = p.a_scale[(m0 + r) * p.a_scale_stride_m + g * p.a_scale_stride_g];
      kernel_6x16_fold(a, ctx.steps, w, g * ctx.group_steps, (g + 1) * ctx.group_steps,
                             pp.w_scale + g * pp.ws_gstride, as, &ybuf[0][0][0]);
    }
  } else {
    for (std::int64_t g = 0; g < ctx.groups; ++g) {
      accumulate_tile<MR>(a, ctx.steps, w, g * ctx.group_steps, (g + 1) * ctx.group_steps, acc);
      __m256 y[MR][2];
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        y[r][0] = _mm256_load_ps(ybuf[r][0]);
        y[r][1] = _mm256_load_ps(ybuf[r][1]);
      }
      fold_group<MR>(p, pp, m0, g, acc, y);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        _mm256_store_ps(ybuf[r][0], y[r][0]);
        _mm256_store_ps(ybuf[r][1], y[r][1]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    finish_row(p, m0 + r, pp.n0, pp.nvalid, _mm256_load_ps(ybuf[r][0]), _mm256_load_ps(ybuf[r][1]));
}

void run_tile(const Context& ctx, const PanelParams& pp, std::int64_t m0, std::int64_t rows) {
  switch (rows) {
    case 1: return tile<1>(ctx, pp, m0);
    case 2: return tile<2>(ctx, pp, m0);
    case 3: return tile<3>(ctx, pp, m0);
    case 4: return tile<4>(ctx, pp, m0);
    case 5: return tile<5>(ctx, pp, m0);
    default: return tile<6>(ctx, pp, m0);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// A widening: int8 [M, K] or int4-packed [M, K/2] -> int16 pairs [M, steps] (as int32), zero-padded.
// With an activation zero point (epilogue mode only), a - zp[m, g] is stored instead of a: sum_k (a - zp) w equals
// acc - zp * colsum exactly (|a - zp| <= 255 fits int16; the int32 sum is bounded like the reference's), so the
// epilogue needs no column sums.
void widen_rows(const GemmProblem& p, std::int64_t steps, std::int64_t group, std::int32_t* out, std::int64_t r0,
                std::int64_t r1) {
  const std::int64_t k = p.k;
  const bool with_zp = p.a_zero_point != nullptr && p.out_accumulators == nullptr;
  for (std::int64_t m = r0; m < r1; ++m) {
    auto* o16 = reinterpret_cast<std::int16_t*>(out + m * steps);
    if (p.a_format == ActivationFormat::int8) {
      const std::int8_t* a = p.a + m * k;
      for (std::int64_t g0 = 0; g0 < k; g0 += group) {
        const std::int64_t g1 = std::min(k, g0 + group);
        const std::int16_t zp =
            with_zp ? static_cast<std::int16_t>(p.a_zero_point[m * p.a_scale_stride_m + (g0 / group) * p.a_scale_stride_g]) : 0;
        const __m256i vzp = _mm256_set1_epi16(zp);
        std::int64_t i = g0;
        for (; i + 16 <= g1; i += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o16 + i),
                              _mm256_sub_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i))), vzp));
        for (; i < g1; ++i) o16[i] = static_cast<std::int16_t>(a[i] - zp);
      }
      for (std::int64_t i = k; i < 2 * steps; ++i) o16[i] = 0;
    } else {
      // One packed byte (low nibble = even k) becomes one int32 pair (int16 lo, int16 hi).
      const auto* a = reinterpret_cast<const std::uint8_t*>(p.a) + m * (k / 2);
      std::int32_t* o = out + m * steps;
      const __m256i low = _mm256_set1_epi32(0x0f), eight = _mm256_set1_epi32(8), mask16 = _mm256_set1_epi32(0xffff);
      for (std::int64_t g0 = 0; g0 < k / 2; g0 += group / 2) {
        const std::int64_t g1 = std::min(k / 2, g0 + group / 2);
        const std::int32_t zp = with_zp ? p.a_zero_point[m * p.a_scale_stride_m + (g0 / (group / 2)) * p.a_scale_stride_g] : 0;
        const __m256i vzp = _mm256_set1_epi32(zp);
        std::int64_t i = g0;
        for (; i + 8 <= g1; i += 8) {
          std::int64_t bytes;
          std::memcpy(&bytes, a + i, sizeof bytes);
          const __m256i v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
          const __m256i lo = _mm256_sub_epi32(_mm256_sub_epi32(_mm256_xor_si256(_mm256_and_si256(v, low), eight), eight), vzp);
          const __m256i hi = _mm256_sub_epi32(_mm256_sub_epi32(_mm256_xor_si256(_mm256_srli_epi32(v, 4), eight), eight), vzp);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i),
                              _mm256_or_si256(_mm256_and_si256(lo, mask16), _mm256_slli_epi32(hi, 16)));
        }
        for (; i < g1; ++i) {
          const int lo = a[i] & 0x0f, hi = a[i] >> 4;
          o16[2 * i] = static_cast<std::int16_t>((lo >= 8 ? lo - 16 : lo) - zp);
          o16[2 * i + 1] = static_cast<std::int16_t>((hi >= 8 ? hi - 16 : hi) - zp);
        }
      }
    }
  }
}

std::vector<std::int32_t>& a_buffer() {
  thread_local std::vector<std::int32_t> buffer;
  return buffer;
}

void gemm_w8(const GemmProblem& p, const Context& ctx) {
  const std::int64_t kp = ctx.steps * 2;
  run_blocks(p, kMR, kp * 2, kp, [&] {
    return [&p, &ctx, pp = PanelParams{}](std::int64_t panel, std::int64_t m_begin, std::int64_t m_end) mutable {
      if (!p.out_accumulators && pp.n0 != panel * kNR) prepare_panel(ctx, panel, pp);
      if (p.out_accumulators) {
        pp.n0 = panel * kNR;
        pp.nvalid = std::min<std::int64_t>(kNR, p.n - pp.n0);
      }
      for (std::int64_t m0 = m_begin; m0 < m_end; m0 += kMR)
        run_tile(ctx, pp, m0, std::min<std::int64_t>(kMR, m_end - m0));
    };
  });
}

}  // namespace

void gemm_w8_avx2(const GemmProblem& p) {
  const PackedWeights& w = *p.weights;
  Context ctx;
  ctx.p = &p;
  ctx.steps = w.padded_k() / 2;
  ctx.w = w.data();
  if (!p.out_accumulators && w.group_size() > 0 && w.group_size() < p.k) {
    ctx.groups = p.k / w.group_size();
    ctx.group_steps = w.group_size() / 2;  // group_size is even: groups never split a k pair
  } else {
    ctx.groups = 1;
    ctx.group_steps = ctx.steps;
  }
  std::vector<std::int32_t>& abuf = a_buffer();
  if (abuf.size() < static_cast<std::size_t>(p.m * ctx.steps)) abuf.resize(static_cast<std::size_t>(p.m * ctx.steps));
  ctx.a16 = abuf.data();
  const std::int64_t min_rows = std::max<std::int64_t>(1, 65536 / std::max<std::int64_t>(1, p.k));
  const std::int64_t group = ctx.groups > 1 ? w.group_size() : std::max<std::int64_t>(2, round_up(p.k, 2));
  parallel_for(p.m, min_rows,
               [&](std::int64_t r0, std::int64_t r1) { widen_rows(p, ctx.steps, group, abuf.data(), r0, r1); });
  gemm_w8(p, ctx);
}

}  // namespace osengine::detail
