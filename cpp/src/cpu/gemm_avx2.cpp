// AVX2 int8 / int4 GEMMs with the fused OS+ epilogue; bit-identical to gemm_reference.cpp. Two exact schemes (no
// VNNI on the target, so no vpdpbusd):
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
//   float_math.hpp), + residual, store fp32 or bf16 (round to nearest even, as float_to_bf16).
//
// Blocking / threading (both schemes): the work is cut into items (M block of MB rows) x (N panel of 16 columns),
//   M block outer, so a thread streams the A block (equal blocks of <= ~3 MB, staying in L3 next to W) once per
//   panel while the panel stays in L2. One parallel_for body per thread; the threads claim chunks of items from an
//   atomic counter (dynamic balance on a shared machine), and the minimum chunk (~2M MACs) keeps small problems on
//   one thread. M = 1 (decode) uses 1-row tiles: W streamed once.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "common/threading.hpp"
#include "cpu/float_math_avx2.hpp"
#include "kernels.hpp"

namespace osengine::detail {

namespace {

constexpr std::int64_t kNR = 16;  // panel width (output channels)
constexpr int kMR = 6;            // rows per microkernel tile

inline std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

// Byte offset and nibble of W element (column c in 0..15 of a panel, t = k & 1) inside one k-pair step.
inline std::int64_t w8_offset(std::int64_t c, std::int64_t t) { return (c / 8) * 16 + (c % 8) * 2 + t; }

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
      _mm_prefetch(reinterpret_cast<const char*>(w + (s + 32) * sb), _MM_HINT_T0);
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

// ---------------------------------------------------------------------------------------------------------------
// Per-panel epilogue parameters, padded to 16 columns.
struct PanelParams {
  std::vector<float> bias;        // [16]
  std::vector<float> w_scale;     // [groups][16], or [16] for all groups (ws_gstride 0)
  std::int64_t ws_gstride = 0;
  std::int64_t n0 = -1, nvalid = 0;
};

struct Context {
  const GemmProblem* p = nullptr;
  const std::int32_t* a16 = nullptr;  // widened A [M, steps] int32 pairs
  std::int64_t steps = 0;             // Kp / 2
  std::int64_t groups = 1, group_steps = 0;
  const std::uint8_t* w = nullptr;
};

void prepare_panel(const Context& ctx, std::int64_t panel, PanelParams& pp) {
  const GemmProblem& p = *ctx.p;
  pp.n0 = panel * kNR;
  pp.nvalid = std::min<std::int64_t>(kNR, p.n - pp.n0);
  pp.bias.assign(kNR, 0.0f);
  if (p.bias) std::memcpy(pp.bias.data(), p.bias + pp.n0, static_cast<std::size_t>(pp.nvalid) * sizeof(float));
  if (p.w_scale_stride_g == 0 || ctx.groups == 1) {
    // The same 16 scales for every group.
    pp.ws_gstride = 0;
    pp.w_scale.assign(kNR, 0.0f);
    for (std::int64_t c = 0; c < pp.nvalid; ++c) pp.w_scale[c] = p.w_scale[(pp.n0 + c) * p.w_scale_stride_n];
  } else {
    // [groups][16] from w_scale[n * stride_n + g * stride_g]: read each channel's run of groups contiguously.
    pp.ws_gstride = kNR;
    pp.w_scale.assign(static_cast<std::size_t>(ctx.groups * kNR), 0.0f);
    float* dst = pp.w_scale.data();
    for (std::int64_t c = 0; c < pp.nvalid; ++c) {
      const float* src = p.w_scale + (pp.n0 + c) * p.w_scale_stride_n;
      for (std::int64_t g = 0; g < ctx.groups; ++g) dst[g * kNR + c] = src[g * p.w_scale_stride_g];
    }
  }
}

template <int MR>
inline void fold_group(const GemmProblem& p, const PanelParams& pp, std::int64_t m0, std::int64_t g,
                       const __m256i (&acc)[MR][2], __m256 (&y)[MR][2]) {
  const __m256 ws0 = _mm256_loadu_ps(pp.w_scale.data() + g * pp.ws_gstride);
  const __m256 ws1 = _mm256_loadu_ps(pp.w_scale.data() + g * pp.ws_gstride + 8);
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    const std::int64_t ai = (m0 + r) * p.a_scale_stride_m + g * p.a_scale_stride_g;
    // The zero point was folded into the widened A: acc already is acc - zp * colsum.
    const __m256i c0 = acc[r][0], c1 = acc[r][1];
    const __m256 as = _mm256_set1_ps(p.a_scale[ai]);
    y[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c0), _mm256_mul_ps(as, ws0), y[r][0]);
    y[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c1), _mm256_mul_ps(as, ws1), y[r][1]);
  }
}

inline __m256 activate(Activation act, __m256 x) {
  switch (act) {
    case Activation::none: return x;
    case Activation::relu: return _mm256_max_ps(x, _mm256_setzero_ps());
    case Activation::gelu: return avx2::gelu_approx(x);
    case Activation::gelu_tanh: return avx2::gelu_tanh_approx(x);
    case Activation::silu: return avx2::silu_approx(x);
  }
  return x;
}

// Activation, residual and store of one row of 16 (nvalid) outputs.
inline void finish_row(const GemmProblem& p, std::int64_t m, std::int64_t n0, std::int64_t nvalid, __m256 y0,
                       __m256 y1) {
  y0 = activate(p.activation, y0);
  y1 = activate(p.activation, y1);
  const std::int64_t base = m * p.n + n0;
  if (p.residual) {
    if (nvalid == kNR) {
      if (p.residual_dtype == DType::bfloat16) {
        const auto* r = static_cast<const std::uint16_t*>(p.residual) + base;
        y0 = _mm256_add_ps(y0, avx2::load_bf16(r));
        y1 = _mm256_add_ps(y1, avx2::load_bf16(r + 8));
      } else {
        const auto* r = static_cast<const float*>(p.residual) + base;
        y0 = _mm256_add_ps(y0, _mm256_loadu_ps(r));
        y1 = _mm256_add_ps(y1, _mm256_loadu_ps(r + 8));
      }
    } else {
      alignas(32) float tmp[kNR] = {};
      for (std::int64_t c = 0; c < nvalid; ++c)
        tmp[c] = p.residual_dtype == DType::bfloat16 ? bf16_to_float(static_cast<const std::uint16_t*>(p.residual)[base + c])
                                                     : static_cast<const float*>(p.residual)[base + c];
      y0 = _mm256_add_ps(y0, _mm256_load_ps(tmp));
      y1 = _mm256_add_ps(y1, _mm256_load_ps(tmp + 8));
    }
  }
  if (p.out_dtype == DType::bfloat16) {
    auto* o = static_cast<std::uint16_t*>(p.out) + base;
    const __m128i h0 = avx2::float_to_bf16(y0), h1 = avx2::float_to_bf16(y1);
    if (nvalid == kNR) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), h0);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 8), h1);
    } else {
      alignas(16) std::uint16_t tmp[kNR];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h0);
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp + 8), h1);
      std::memcpy(o, tmp, static_cast<std::size_t>(nvalid) * sizeof(std::uint16_t));
    }
  } else {
    float* o = static_cast<float*>(p.out) + base;
    if (nvalid == kNR) {
      _mm256_storeu_ps(o, y0);
      _mm256_storeu_ps(o + 8, y1);
    } else {
      alignas(32) float tmp[kNR];
      _mm256_store_ps(tmp, y0);
      _mm256_store_ps(tmp + 8, y1);
      std::memcpy(o, tmp, static_cast<std::size_t>(nvalid) * sizeof(float));
    }
  }
}

// The end of an ungrouped MR x 16 tile (rows m0 .. m0 + MR of panel pp) from its int32 sums: raw accumulators out,
// or the epilogue.
template <int MR>
void finish_tile(const GemmProblem& p, const PanelParams& pp, std::int64_t m0, const __m256i (&acc)[MR][2]) {
  if (p.out_accumulators) {
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      std::int32_t* o = p.out_accumulators + (m0 + r) * p.n + pp.n0;
      if (pp.nvalid == kNR) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), acc[r][0]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), acc[r][1]);
      } else {
        alignas(32) std::int32_t tmp[kNR];
        _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc[r][0]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8), acc[r][1]);
        std::memcpy(o, tmp, static_cast<std::size_t>(pp.nvalid) * sizeof(std::int32_t));
      }
    }
    return;
  }
  __m256 y[MR][2];
  const __m256 b0 = _mm256_loadu_ps(pp.bias.data()), b1 = _mm256_loadu_ps(pp.bias.data() + 8);
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    y[r][0] = b0;
    y[r][1] = b1;
  }
  fold_group<MR>(p, pp, m0, 0, acc, y);
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) finish_row(p, m0 + r, pp.n0, pp.nvalid, y[r][0], y[r][1]);
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
                             pp.w_scale.data() + g * pp.ws_gstride, as, &ybuf[0][0][0]);
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

// Work split shared by the W8 and W4 GEMMs: items = (M block of mb rows) x (N panel of 16 columns), M block outer.
// mb keeps the prepared A block (a_row_bytes per row) at <= ~3 MB, in the L3 next to W; with few panels it is cut
// so that the threads get enough items, and the blocks are made equal (a capped first block would leave the last
// one short and the threads unbalanced). One body per thread, made by make_worker() (its per-thread state); the
// threads claim chunks of items from a shared counter, in order (so they work on the same A block at the same
// time), which also keeps the others going when the machine is shared and one thread gets descheduled. The minimum
// chunk (~2M MACs, k_macs per row and column) keeps small problems on one thread. A worker is called as
// work(panel, m_begin, m_end).
template <class MakeWorker>
void run_blocks(const GemmProblem& p, std::int64_t mr, std::int64_t a_row_bytes, std::int64_t k_macs,
                MakeWorker make_worker) {
  const std::int64_t n_panels = (p.n + kNR - 1) / kNR;
  const int threads = get_num_threads();
  std::int64_t mb = std::max<std::int64_t>(mr, (std::int64_t{3} << 20) / a_row_bytes / mr * mr);
  const std::int64_t want_items = 4 * static_cast<std::int64_t>(threads);
  if (n_panels < want_items) {
    const std::int64_t blocks = (want_items + n_panels - 1) / n_panels;
    mb = std::min(mb, round_up((p.m + blocks - 1) / blocks, mr));
  }
  mb = std::max<std::int64_t>(mb, mr);
  std::int64_t m_blocks = (p.m + mb - 1) / mb;
  mb = round_up((p.m + m_blocks - 1) / m_blocks, mr);
  m_blocks = (p.m + mb - 1) / mb;
  const std::int64_t items = m_blocks * n_panels;
  const std::int64_t item_macs = std::min(mb, p.m) * kNR * k_macs;
  const std::int64_t min_chunk = std::max<std::int64_t>(1, (std::int64_t{1} << 21) / std::max<std::int64_t>(1, item_macs));
  const std::int64_t workers = std::max<std::int64_t>(1, std::min<std::int64_t>(threads, items / min_chunk));
  const std::int64_t chunk = std::max(min_chunk, items / (workers * 16));
  std::atomic<std::int64_t> next{0};
  parallel_for(workers, 1, [&](std::int64_t, std::int64_t) {
    auto work = make_worker();
    for (;;) {
      const std::int64_t begin = next.fetch_add(chunk);
      if (begin >= items) break;
      const std::int64_t end = std::min(items, begin + chunk);
      for (std::int64_t item = begin; item < end; ++item) {
        const std::int64_t block = item / n_panels, panel = item % n_panels;
        work(panel, block * mb, std::min(p.m, (block + 1) * mb));
      }
    }
  });
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

struct W4Shape {
  std::int64_t groups = 1, group_size = 0, group_k = 0;  // group_k = group_size rounded up to 4
  std::int64_t padded_k() const { return groups * group_k; }
  std::int64_t steps() const { return padded_k() / 4; }
  std::int64_t packed_k(std::int64_t kk) const { return (kk / group_size) * group_k + kk % group_size; }
};

inline W4Shape w4_shape(std::int64_t k, std::int64_t group_size) {
  W4Shape s;
  s.group_size = group_size > 0 ? group_size : k;
  s.groups = k / s.group_size;
  s.group_k = round_up(s.group_size, 4);
  return s;
}

struct W4Context {
  const GemmProblem* p = nullptr;
  W4Shape shape;
  const std::int8_t* a = nullptr;       // prepared A [M, padded_k] int8, zero-padded per group
  const std::int32_t* rowsum = nullptr;  // [M, groups]
  const std::uint8_t* w = nullptr;
};

// Per-panel column sums [groups][16] (the zero-point correction) next to the epilogue parameters.
void prepare_w4_panel(const W4Context& c, std::int64_t panel, PanelParams& pp, std::vector<std::int32_t>& colsum) {
  Context ctx;
  ctx.p = c.p;
  ctx.groups = c.shape.groups;
  if (!c.p->out_accumulators) prepare_panel(ctx, panel, pp);
  pp.n0 = panel * kNR;
  pp.nvalid = std::min<std::int64_t>(kNR, c.p->n - pp.n0);
  colsum.assign(static_cast<std::size_t>(c.shape.groups * kNR), 0);
  const std::vector<std::int32_t>& sums = c.p->weights->column_sums();  // [groups, N]
  for (std::int64_t g = 0; g < c.shape.groups; ++g)
    for (std::int64_t col = 0; col < pp.nvalid; ++col) colsum[g * kNR + col] = sums[g * c.p->n + pp.n0 + col];
}

template <int MR>
void w4_tile(const W4Context& c, const PanelParams& pp, const std::int32_t* colsum, std::int64_t m0) {
  const GemmProblem& p = *c.p;
  const std::int64_t lda = c.shape.padded_k(), group_steps = c.shape.group_k / 4, groups = c.shape.groups;
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
      __m256i h[MR][2];
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) h[r][0] = h[r][1] = _mm256_setzero_si256();
      for (std::int64_t t = s; t < t_end; ++t) {
        // Decode (one row) streams W from memory once: fetch 512 bytes ahead.
        if constexpr (MR == 1) _mm_prefetch(reinterpret_cast<const char*>(w + (t + 16) * 32), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + t * 32));
        const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          std::int32_t four;
          std::memcpy(&four, a + r * lda + t * 4, sizeof four);
          const __m256i b = _mm256_set1_epi32(four);
          h[r][0] = _mm256_add_epi16(h[r][0], _mm256_maddubs_epi16(lo, b));
          h[r][1] = _mm256_add_epi16(h[r][1], _mm256_maddubs_epi16(hi, b));
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(h[r][0], ones));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(h[r][1], ones));
      }
    }
    // sum (a - zp) w = sum a u - 8 rowsum(a) - zp colsum(w)
    const __m256i cs0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + g * kNR));
    const __m256i cs1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + g * kNR + 8));
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256i bias8 = _mm256_set1_epi32(8 * c.rowsum[(m0 + r) * groups + g]);
      acc[r][0] = _mm256_sub_epi32(acc[r][0], bias8);
      acc[r][1] = _mm256_sub_epi32(acc[r][1], bias8);
      if (with_zp) {
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

// A for the W4 kernels: int8 codes (int4-packed ones unpacked) [M, padded_k], zero-padded per group, and their
// sums per row and group.
void prepare_w4_rows(const GemmProblem& p, const W4Shape& shape, std::int8_t* out, std::int32_t* rowsum,
                     std::int64_t r0, std::int64_t r1) {
  const std::int64_t k = p.k, gs = shape.group_size, lda = shape.padded_k();
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (std::int64_t m = r0; m < r1; ++m) {
    for (std::int64_t g = 0; g < shape.groups; ++g) {
      std::int8_t* dst = out + m * lda + g * shape.group_k;
      if (p.a_format == ActivationFormat::int8) {
        std::memcpy(dst, p.a + m * k + g * gs, static_cast<std::size_t>(gs));
      } else {  // int4 packed two per byte, low nibble = even k; gs is even
        const auto* src = reinterpret_cast<const std::uint8_t*>(p.a) + m * (k / 2) + g * gs / 2;
        for (std::int64_t i = 0; i < gs / 2; ++i) {
          const int lo = src[i] & 0x0f, hi = src[i] >> 4;
          dst[2 * i] = static_cast<std::int8_t>(lo >= 8 ? lo - 16 : lo);
          dst[2 * i + 1] = static_cast<std::int8_t>(hi >= 8 ? hi - 16 : hi);
        }
      }
      for (std::int64_t i = gs; i < shape.group_k; ++i) dst[i] = 0;
      __m256i acc = _mm256_setzero_si256();
      std::int64_t i = 0;
      for (; i + 32 <= gs; i += 32)
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(
                                        ones8, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + i))), ones16));
      alignas(32) std::int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
      std::int32_t sum = 0;
      for (int j = 0; j < 8; ++j) sum += lanes[j];
      for (; i < gs; ++i) sum += dst[i];
      rowsum[m * shape.groups + g] = sum;
    }
  }
}

void gemm_w4(const GemmProblem& p) {
  const PackedWeights& w = *p.weights;
  W4Context c;
  c.p = &p;
  c.shape = w4_shape(p.k, w.group_size());
  c.w = w.data();
  const std::int64_t lda = c.shape.padded_k();
  thread_local std::vector<std::int8_t> a_rows;
  thread_local std::vector<std::int32_t> rowsums;
  if (a_rows.size() < static_cast<std::size_t>(p.m * lda)) a_rows.resize(static_cast<std::size_t>(p.m * lda));
  if (rowsums.size() < static_cast<std::size_t>(p.m * c.shape.groups))
    rowsums.resize(static_cast<std::size_t>(p.m * c.shape.groups));
  c.a = a_rows.data();
  c.rowsum = rowsums.data();
  std::int8_t* a_out = a_rows.data();
  std::int32_t* rowsum_out = rowsums.data();
  parallel_for(p.m, std::max<std::int64_t>(1, 65536 / std::max<std::int64_t>(1, p.k)),
               [&](std::int64_t r0, std::int64_t r1) { prepare_w4_rows(p, c.shape, a_out, rowsum_out, r0, r1); });

  run_blocks(p, kW4MR, lda, lda, [&] {
    return [&c, pp = PanelParams{}, colsum = std::vector<std::int32_t>{}, current = std::int64_t{-1}](
               std::int64_t panel, std::int64_t m_begin, std::int64_t m_end) mutable {
      if (panel != current) {
        prepare_w4_panel(c, panel, pp, colsum);
        current = panel;
      }
      for (std::int64_t m0 = m_begin; m0 < m_end; m0 += kW4MR)
        run_w4_tile(c, pp, colsum.data(), m0, std::min<std::int64_t>(kW4MR, m_end - m0));
    };
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
WeightLayout pack_weights_avx2(const std::int8_t* codes, std::int64_t n, std::int64_t k, int bits,
                               std::int64_t group_size) {
  WeightLayout layout;
  layout.padded_n = round_up(n, kNR);
  if (bits == 8) {
    layout.padded_k = round_up(k, 2);
    const std::int64_t steps = layout.padded_k / 2;
    layout.data.assign(static_cast<std::size_t>(layout.padded_n * layout.padded_k), 0);
    for (std::int64_t row = 0; row < n; ++row) {
      const std::int64_t panel = row / kNR, c = row % kNR;
      std::uint8_t* base = layout.data.data() + panel * steps * 32;
      for (std::int64_t kk = 0; kk < k; ++kk)
        base[(kk / 2) * 32 + w8_offset(c, kk & 1)] = static_cast<std::uint8_t>(codes[row * k + kk]);
    }
    return layout;
  }
  // W4: biased nibbles (w + 8), padding = 8 (weight 0); see the W4 kernels.
  const W4Shape shape = w4_shape(k, group_size);
  layout.padded_k = shape.padded_k();
  const std::int64_t steps = shape.steps();
  layout.data.assign(static_cast<std::size_t>(layout.padded_n / kNR * steps * 32), 0x88);
  for (std::int64_t row = 0; row < n; ++row) {
    const std::int64_t panel = row / kNR, c = row % kNR;
    std::uint8_t* base = layout.data.data() + panel * steps * 32;
    for (std::int64_t kk = 0; kk < k; ++kk) {
      const std::int64_t kp = shape.packed_k(kk);
      std::uint8_t& byte = base[(kp / 4) * 32 + (c % 8) * 4 + kp % 4];
      const auto nib = static_cast<std::uint8_t>((codes[row * k + kk] + 8) & 0x0f);
      byte = c < 8 ? static_cast<std::uint8_t>((byte & 0xf0) | nib) : static_cast<std::uint8_t>((byte & 0x0f) | (nib << 4));
    }
  }
  return layout;
}

void unpack_weights_avx2(const PackedWeights& w, const std::int32_t* rows, std::int64_t count,
                         std::int8_t* codes) {
  const std::int64_t k = w.k();
  const std::uint8_t* data = w.data();
  const W4Shape shape = w4_shape(k, w.group_size());
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int64_t row = rows ? rows[i] : i;
    const std::int64_t panel = row / kNR, c = row % kNR;
    std::int8_t* out = codes + i * k;
    if (w.bits() == 8) {
      const std::int64_t steps = w.padded_k() / 2;
      const std::uint8_t* base = data + panel * steps * 32 + w8_offset(c, 0);
      for (std::int64_t kk = 0; kk < k; ++kk) out[kk] = static_cast<std::int8_t>(base[(kk / 2) * 32 + (kk & 1)]);
    } else {
      const std::uint8_t* base = data + panel * shape.steps() * 32;
      for (std::int64_t kk = 0; kk < k; ++kk) {
        const std::int64_t kp = shape.packed_k(kk);
        const std::uint8_t byte = base[(kp / 4) * 32 + (c % 8) * 4 + kp % 4];
        out[kk] = static_cast<std::int8_t>(((c < 8 ? byte : byte >> 4) & 0x0f) - 8);
      }
    }
  }
}

void gemm_avx2(const GemmProblem& p) {
  const PackedWeights& w = *p.weights;
  if (w.bits() == 4) return gemm_w4(p);
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
