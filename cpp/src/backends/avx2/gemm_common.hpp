// Pieces shared by the AVX2 W8 and W4 GEMMs (gemm_w8.cpp, gemm_w4.cpp), their weight layouts (pack.cpp) and the
// AVX-512 VNNI backend built on them (backends/avx512_vnni): the
// panel of 16 output channels, the fp32 epilogue on register tiles (bit-identical to backends/epilogue.hpp), the
// blocking and threading of the work, and the W4 layout's shape. Only include from files compiled with -mavx2 -mfma.
//
// Blocking / threading (both schemes): the work is cut into items (M block of MB rows) x (N panel of 16 columns),
//   M block outer, so a thread streams the A block (equal blocks of <= ~3 MB, staying in L3 next to W) once per
//   panel while the panel stays in L2. One parallel_for body per thread; the threads claim chunks of items from an
//   atomic counter (dynamic balance on a shared machine), and the minimum chunk (~2M MACs) keeps small problems on
//   one thread. M = 1 (decode) uses 1-row tiles: W streamed once.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "backends/avx2/avx2.hpp"
#include "backends/avx2/float_math_avx2.hpp"
#include "backends/epilogue.hpp"
#include "backends/kernels.hpp"
#include "core/threading.hpp"

namespace osengine::detail::avx2_gemm {

constexpr std::int64_t kNR = 16;  // panel width (output channels)

inline std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

// Byte offset and nibble of W element (column c in 0..15 of a panel, t = k & 1) inside one k-pair step.
inline std::int64_t w8_offset(std::int64_t c, std::int64_t t) { return (c / 8) * 16 + (c % 8) * 2 + t; }

// ---------------------------------------------------------------------------------------------------------------
// Per-panel epilogue parameters, padded to 16 columns.
struct PanelParams {
  std::vector<float> bias;        // [16]
  const float* w_scale = nullptr;  // [groups][16], or [16] for all groups (ws_gstride 0)
  const std::uint16_t* w_scale_f16 = nullptr;  // instead of w_scale: float16 bits, [groups][16]
  std::int64_t ws_gstride = 0;
  std::vector<float> w_scale_storage;  // what w_scale points to when the problem has no arranged scales
  std::int64_t n0 = -1, nvalid = 0;
};

struct Context {
  const GemmProblem* p = nullptr;
  const std::int32_t* a16 = nullptr;  // widened A [M, steps] int32 pairs
  std::int64_t steps = 0;             // Kp / 2
  std::int64_t groups = 1, group_steps = 0;
  const std::uint8_t* w = nullptr;
};

inline void prepare_panel(const Context& ctx, std::int64_t panel, PanelParams& pp) {
  const GemmProblem& p = *ctx.p;
  pp.n0 = panel * kNR;
  pp.nvalid = std::min<std::int64_t>(kNR, p.n - pp.n0);
  pp.bias.assign(kNR, 0.0f);
  pp.w_scale_f16 = nullptr;
  if (p.bias) std::memcpy(pp.bias.data(), p.bias + pp.n0, static_cast<std::size_t>(pp.nvalid) * sizeof(float));
  if (p.w_scale_stride_g == 0 || ctx.groups == 1) {
    // The same 16 scales for every group.
    pp.ws_gstride = 0;
    pp.w_scale_storage.assign(kNR, 0.0f);
    for (std::int64_t c = 0; c < pp.nvalid; ++c) pp.w_scale_storage[c] = p.w_scale[(pp.n0 + c) * p.w_scale_stride_n];
    pp.w_scale = pp.w_scale_storage.data();
  } else if (p.w_scale_arranged != nullptr) {
    // Already [panel][group][16] (arrange_weight_scales_avx2).
    pp.ws_gstride = kNR;
    pp.w_scale = p.w_scale_arranged + panel * ctx.groups * kNR;
  } else if (p.w_scale_arranged_f16 != nullptr) {
    pp.ws_gstride = kNR;
    pp.w_scale = nullptr;
    pp.w_scale_f16 = p.w_scale_arranged_f16 + panel * ctx.groups * kNR;
  } else {
    // [groups][16] from w_scale[n * stride_n + g * stride_g]: read each channel's run of groups contiguously.
    pp.ws_gstride = kNR;
    pp.w_scale_storage.assign(static_cast<std::size_t>(ctx.groups * kNR), 0.0f);
    float* dst = pp.w_scale_storage.data();
    for (std::int64_t c = 0; c < pp.nvalid; ++c) {
      const float* src = p.w_scale + (pp.n0 + c) * p.w_scale_stride_n;
      for (std::int64_t g = 0; g < ctx.groups; ++g) dst[g * kNR + c] = src[g * p.w_scale_stride_g];
    }
    pp.w_scale = pp.w_scale_storage.data();
  }
}

template <int MR>
inline void fold_group(const GemmProblem& p, const PanelParams& pp, std::int64_t m0, std::int64_t g,
                       const __m256i (&acc)[MR][2], __m256 (&y)[MR][2]) {
  __m256 ws0, ws1;
  if (pp.w_scale_f16 != nullptr) {  // exact float16 values: the same floats
    ws0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pp.w_scale_f16 + g * pp.ws_gstride)));
    ws1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pp.w_scale_f16 + g * pp.ws_gstride + 8)));
  } else {
    ws0 = _mm256_loadu_ps(pp.w_scale + g * pp.ws_gstride);
    ws1 = _mm256_loadu_ps(pp.w_scale + g * pp.ws_gstride + 8);
  }
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
      for (std::int64_t c = 0; c < nvalid; ++c) tmp[c] = load_float(p.residual, p.residual_dtype, base + c);
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

// Work split shared by the W8 and W4 GEMMs: items = (M block of mb rows) x (N panel of 16 columns), M block outer.
// mb keeps the prepared A block (a_row_bytes per row) at <= ~3 MB, in the L3 next to W; with few panels it is cut
// so that the threads get enough items, and the blocks are made equal (a capped first block would leave the last
// one short and the threads unbalanced). One body per thread, made by make_worker() (its per-thread state); the
// threads claim chunks of items from a shared counter, in order (so they work on the same A block at the same
// time), which also keeps the others going when the machine is shared and one thread gets descheduled. The minimum
// chunk (~2M MACs, k_macs per row and column, or ~32 KB of weights) keeps small problems on one thread. A worker
// is called as work(panel, m_begin, m_end).
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
  // A chunk is worth a thread once it holds ~2M MACs or, for the few rows of a decode step (memory bound: each
  // panel's weights are read once), ~32 KB of weights.
  const std::int64_t item_weight_bytes = kNR * k_macs;
  const std::int64_t min_chunk = std::max<std::int64_t>(
      1, std::min((std::int64_t{1} << 21) / std::max<std::int64_t>(1, item_macs),
                  (std::int64_t{1} << 15) / std::max<std::int64_t>(1, item_weight_bytes)));
  const std::int64_t workers = std::max<std::int64_t>(1, std::min<std::int64_t>(threads, items / min_chunk));
  // Few rows (decode): reading W is the whole cost, so each thread streams one contiguous run of panels (the
  // hardware prefetcher follows it); otherwise small chunks balance the threads.
  const bool streaming = p.m < 8;
  const std::int64_t chunk =
      streaming ? (items + workers - 1) / workers : std::max(min_chunk, items / (workers * 16));
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

// K cut into groups (all of K without groups), each padded to a multiple of step_k, so that a kernel step of step_k
// inputs never straddles two groups: the AVX2 W4 layout and the AVX-512 VNNI W8 layout step by 4, the VNNI W4
// layout by 8.
struct W4Shape {
  std::int64_t groups = 1, group_size = 0, group_k = 0, step_k = 4;  // group_k = group_size rounded up to step_k
  std::int64_t padded_k() const { return groups * group_k; }
  std::int64_t steps() const { return padded_k() / step_k; }
  std::int64_t group_steps() const { return group_k / step_k; }
  std::int64_t packed_k(std::int64_t kk) const { return (kk / group_size) * group_k + kk % group_size; }
};

inline W4Shape w4_shape(std::int64_t k, std::int64_t group_size, std::int64_t step_k = 4) {
  W4Shape s;
  s.group_size = group_size > 0 ? group_size : k;
  s.groups = k / s.group_size;
  s.step_k = step_k;
  s.group_k = round_up(s.group_size, step_k);
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// W4 (int4 weights): the prepared A, the per-panel column sums and the driver shared by the W4 tile kernels
// (avx2/gemm_w4.cpp on the layout of pack.cpp; avx512_vnni/gemm_w4.cpp on its own).
struct W4Context {
  const GemmProblem* p = nullptr;
  W4Shape shape;
  const std::int8_t* a = nullptr;       // prepared A [M, padded_k] int8, zero-padded per group
  const std::int32_t* rowsum = nullptr;  // [M, groups]
  const std::uint8_t* w = nullptr;
};

// Per-panel column sums [groups][16] (the zero-point correction) next to the epilogue parameters.
inline void prepare_w4_panel(const W4Context& c, std::int64_t panel, PanelParams& pp, std::vector<std::int32_t>& colsum) {
  Context ctx;
  ctx.p = c.p;
  ctx.groups = c.shape.groups;
  if (!c.p->out_accumulators) prepare_panel(ctx, panel, pp);
  pp.n0 = panel * kNR;
  pp.nvalid = std::min<std::int64_t>(kNR, c.p->n - pp.n0);
  // Only an activation zero point needs them: the sums are [groups, N], one cache line per group and panel, as many
  // bytes as a quarter of the int4 weights, which a symmetric decode step would otherwise read for nothing.
  if (c.p->a_zero_point == nullptr || c.p->out_accumulators) {
    colsum.clear();
    return;
  }
  colsum.assign(static_cast<std::size_t>(c.shape.groups * kNR), 0);
  const std::vector<std::int32_t>& sums = c.p->weights->column_sums();  // [groups, N]
  for (std::int64_t g = 0; g < c.shape.groups; ++g)
    for (std::int64_t col = 0; col < pp.nvalid; ++col) colsum[g * kNR + col] = sums[g * c.p->n + pp.n0 + col];
}

// A for the W4 kernels: int8 codes (int4-packed ones unpacked) [M, padded_k], zero-padded per group, and their
// sums per row and group.
inline void prepare_w4_rows(const GemmProblem& p, const W4Shape& shape, std::int8_t* out, std::int32_t* rowsum,
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

// The W4 GEMM around a tile kernel (the AVX2 one, or the AVX-512 VNNI one on its layout of step_k = 8): A prepared
// once per call (prepare_w4_rows), then the blocks of run_blocks, tiles of up to `mr` rows.
// run_tile(c, pp, colsum, m0, rows).
template <class RunTile>
void run_w4(const GemmProblem& p, std::int64_t mr, std::int64_t step_k, RunTile run_tile) {
  const PackedWeights& w = *p.weights;
  W4Context c;
  c.p = &p;
  c.shape = w4_shape(p.k, w.group_size(), step_k);
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

  run_blocks(p, mr, lda, lda, [&] {
    return [&c, &run_tile, mr, pp = PanelParams{}, colsum = std::vector<std::int32_t>{}, current = std::int64_t{-1}](
               std::int64_t panel, std::int64_t m_begin, std::int64_t m_end) mutable {
      if (panel != current) {
        prepare_w4_panel(c, panel, pp, colsum);
        current = panel;
      }
      for (std::int64_t m0 = m_begin; m0 < m_end; m0 += mr)
        run_tile(c, pp, colsum.data(), m0, std::min<std::int64_t>(mr, m_end - m0));
    };
  });
}

}  // namespace osengine::detail::avx2_gemm
