// The LLaMA-family forward pass (llama, mistral, qwen2) over a KV cache, on the engine's ops.
//
// Per block, as the Python engine runs it (osengine.runtime.fusion): q/k/v read one input and, when they share one
// activation quantizer, are one GEMM whose quantization applies the block's RMSNorm; gate/up likewise, and down_proj's
// quantization computes silu(gate) * up from their output. The residual adds ride the GEMM epilogue. Work is split by
// rows, heads or output channels only (no reduction is split), so any thread count gives the same logits.
#include "osengine/runtime/context.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>

#include "osengine/backend.hpp"
#include "osengine/errors.hpp"
#include "osengine/gemm.hpp"
#include "osengine/runtime/attention.hpp"
#include "osengine/quantize.hpp"
#include "core/threading.hpp"
#include "float_kernels.hpp"

namespace osengine::runtime {
namespace {

constexpr const char* kOp = "runtime::Context";

// A row-major [rows, cols] float matrix slice: element (r, c) at data[r * stride + c].
struct Rows {
  float* data;
  std::int64_t stride;
};

// LLaMA's RMSNorm in fp32: weight * (x * 1 / sqrt(mean(x^2) + eps)).
void rms_norm(const float* x, const float* weight, float eps, std::int64_t d, float* out) {
  float sum = 0.0f;
  for (std::int64_t i = 0; i < d; ++i) sum += x[i] * x[i];
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(d) + eps);
  for (std::int64_t i = 0; i < d; ++i) out[i] = weight[i] * (x[i] * r);
}

float silu(float x) { return x / (1.0f + std::exp(-x)); }

// y[m, n] (row stride ldy) = x[m, k] W^T + b (+ residual[m, n] with row stride ldy when given), fp32.
void float_linear(const FloatLinear& f, const float* x, int m, float* y, std::int64_t ldy, const float* residual) {
  const std::int64_t k = f.in_features, n = f.out_features;
#pragma omp parallel for schedule(static) num_threads(get_num_threads())
  for (std::int64_t j = 0; j < n; ++j) {
    const float* w = f.weight.data() + j * k;
    for (int r = 0; r < m; ++r) {
      float acc = detail::float_kernels().dot(x + r * k, w, k);
      if (!f.bias.empty()) acc += f.bias[static_cast<std::size_t>(j)];
      if (residual != nullptr) acc += residual[r * ldy + j];
      y[r * ldy + j] = acc;
    }
  }
}

}  // namespace

Context::Context(std::shared_ptr<const Model> model, const ContextOptions& options)
    : model_(std::move(model)), options_(options) {
  if (!model_) throw ArgumentError(kOp, "model", "is null");
  if (options_.n_ctx <= 0) throw ArgumentError(kOp, "n_ctx", "must be positive, got " + std::to_string(options_.n_ctx));
  if (options_.n_batch <= 0)
    throw ArgumentError(kOp, "n_batch", "must be positive, got " + std::to_string(options_.n_batch));
  if (options_.n_threads < 0)
    throw ArgumentError(kOp, "n_threads", "must be >= 0, got " + std::to_string(options_.n_threads));
  if (options_.n_seq <= 0) throw ArgumentError(kOp, "n_seq", "must be positive, got " + std::to_string(options_.n_seq));
  const ModelInfo& info = model_->info();
  const auto nb = static_cast<std::size_t>(options_.n_batch);
  const auto d = static_cast<std::size_t>(info.n_embd);
  const auto q_out = static_cast<std::size_t>(info.n_head) * static_cast<std::size_t>(info.head_dim);
  const auto kv_out = static_cast<std::size_t>(info.n_head_kv) * static_cast<std::size_t>(info.head_dim);
  const auto ff = static_cast<std::size_t>(info.n_ff);
  const std::size_t cache = static_cast<std::size_t>(options_.n_seq) * static_cast<std::size_t>(key_slots()) * kv_out;
  k_cache_.resize(static_cast<std::size_t>(info.n_layer));
  v_cache_.resize(static_cast<std::size_t>(info.n_layer));
  for (std::size_t l = 0; l < k_cache_.size(); ++l) {
    k_cache_[l].allocate(cache);
    v_cache_[l].allocate(cache);
  }
  n_past_.assign(static_cast<std::size_t>(options_.n_seq), 0);
  write_prefix();
  row_seq_.resize(nb);
  row_groups_.reserve(nb + 1);
  row_pos_.resize(nb);
  const std::size_t half = static_cast<std::size_t>(info.head_dim / 2);
  rope_inv_freq_.resize(half);
  rope_inv_freq(info.rope_theta, info.head_dim, rope_inv_freq_.data());
  rope_cos_.resize(nb * half);
  rope_sin_.resize(nb * half);
  std::size_t widest_gemm = std::max({q_out + 2 * kv_out, 2 * ff, d});
  std::size_t widest_input = std::max({d, q_out, 2 * ff});
  x_.resize(nb * d);
  y_.resize(nb * d);
  normed_.resize(nb * std::max(d, ff));
  up_.resize(nb * ff);
  fused_out_.resize(nb * widest_gemm);
  q_.resize(nb * q_out);
  k_.resize(nb * kv_out);
  v_.resize(nb * kv_out);
  attn_.resize(nb * q_out);
  hidden_.resize(nb * ff);
  // attention scratch: kAttendRows rows of scores per thread
  attention_slots_ = std::max({1, options_.n_threads, get_num_threads()});
  scores_.resize(static_cast<std::size_t>(attention_slots_) * detail::kAttendRows * static_cast<std::size_t>(key_slots()));
  logits_.resize(static_cast<std::size_t>(info.n_vocab) * std::min<std::size_t>(nb, static_cast<std::size_t>(options_.n_seq)));
  codes_.resize(nb * widest_input);
  a_scale_.resize(nb * widest_input);
  a_zero_point_.resize(nb * widest_input);
}

// The prefix's stored keys and values at cache positions 0 .. prefix_length() - 1 of every sequence (never
// overwritten: a sequence's own tokens go after them).
void Context::write_prefix() {
  const ModelInfo& info = model_->info();
  const std::int64_t p_len = prefix_length(), hd = info.head_dim, slots = key_slots();
  if (p_len == 0) return;
  for (int layer = 0; layer < info.n_layer; ++layer) {
    const Block& block = model_->blocks()[static_cast<std::size_t>(layer)];
    for (std::int64_t seq = 0; seq < options_.n_seq; ++seq)
      for (std::int64_t g = 0; g < info.n_head_kv; ++g) {
        float* keys = k_cache_[static_cast<std::size_t>(layer)].get() + (seq * info.n_head_kv + g) * slots * hd;
        float* values = v_cache_[static_cast<std::size_t>(layer)].get() + (seq * info.n_head_kv + g) * slots * hd;
        const float* stored_keys = block.prefix_keys.data() + g * p_len * hd;
        const float* stored_values = block.prefix_values.data() + g * p_len * hd;
        for (std::int64_t pos = 0; pos < p_len; ++pos)
          for (std::int64_t i = 0; i < hd; ++i) {
            keys[detail::key_offset(pos, i, hd)] = stored_keys[pos * hd + i];
            values[pos * hd + i] = stored_values[pos * hd + i];
          }
      }
  }
}

void Context::check_seq(int seq, const char* argument) const {
  if (seq < 0 || seq >= options_.n_seq)
    throw ArgumentError(kOp, argument, "must lie in [0, n_seq = " + std::to_string(options_.n_seq) + "), got " +
                                           std::to_string(seq));
}

int Context::n_past(int seq) const {
  check_seq(seq, "seq");
  return n_past_[static_cast<std::size_t>(seq)];
}

void Context::kv_clear(int seq) {
  if (seq == -1) {
    std::fill(n_past_.begin(), n_past_.end(), 0);
    return;
  }
  check_seq(seq, "seq");
  n_past_[static_cast<std::size_t>(seq)] = 0;
}

void Context::kv_truncate(int pos, int seq) {
  check_seq(seq, "seq");
  int& n_past = n_past_[static_cast<std::size_t>(seq)];
  if (pos < 0 || pos > n_past)
    throw ArgumentError(kOp, "pos", "must lie in [0, n_past = " + std::to_string(n_past) + "], got " +
                                        std::to_string(pos));
  n_past = pos;
}

const float* Context::logits(int i) const {
  if (logits_rows_ == 0) throw ArgumentError(kOp, "logits", "no tokens were decoded yet");
  if (i < 0) i += logits_rows_;
  if (!all_logits_ && i == logits_rows_ - 1) return logits_.data();
  if (!all_logits_ || i < 0 || i >= logits_rows_)
    throw ArgumentError(kOp, "i", "the logits of token " + std::to_string(i) +
                                      " were not kept (decode with all_logits = true)");
  return logits_.data() + static_cast<std::size_t>(i) * static_cast<std::size_t>(model_->info().n_vocab);
}

void Context::check_tokens(const std::int32_t* tokens, std::size_t n) const {
  const ModelInfo& info = model_->info();
  if (n == 0) throw ArgumentError(kOp, "tokens", "is empty");
  if (tokens == nullptr) throw ArgumentError(kOp, "tokens", "is null");
  for (std::size_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= info.n_vocab)
      throw ArgumentError(kOp, "tokens", "token " + std::to_string(i) + " is " + std::to_string(tokens[i]) +
                                             ", outside the vocabulary [0, " + std::to_string(info.n_vocab) + ")");
}

// Room for `rows` rows of logits (grows only for all_logits over more rows than the context was sized for).
float* Context::logits_for(std::size_t rows) {
  const std::size_t need = rows * static_cast<std::size_t>(model_->info().n_vocab);
  if (logits_.size() < need) logits_.resize(need);
  return logits_.data();
}

void Context::decode(const std::int32_t* tokens, std::size_t n, bool all_logits, int seq) {
  check_tokens(tokens, n);
  check_seq(seq, "seq");
  const int pos0 = n_past_[static_cast<std::size_t>(seq)];
  if (static_cast<std::size_t>(pos0) + n > static_cast<std::size_t>(options_.n_ctx))
    throw ArgumentError(kOp, "tokens", std::to_string(n) + " tokens after " + std::to_string(pos0) +
                                           " do not fit the context of n_ctx = " + std::to_string(options_.n_ctx));
  const ThreadCountScope threads(options_.n_threads);
  const auto n_vocab = static_cast<std::size_t>(model_->info().n_vocab);
  float* logits = logits_for(all_logits ? n : 1);
  all_logits_ = all_logits;
  logits_rows_ = static_cast<int>(n);
  for (std::size_t start = 0; start < n; start += static_cast<std::size_t>(options_.n_batch)) {
    const int m = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(options_.n_batch), n - start));
    const bool last_chunk = start + static_cast<std::size_t>(m) == n;
    for (int r = 0; r < m; ++r) {
      row_seq_[static_cast<std::size_t>(r)] = seq;
      row_pos_[static_cast<std::size_t>(r)] = prefix_length() + pos0 + static_cast<int>(start) + r;
    }
    // every chunk's logits with all_logits (each at its rows); otherwise only the last token's
    forward(tokens + start, m, all_logits ? 0 : (last_chunk ? m - 1 : m), logits + (all_logits ? start * n_vocab : 0));
    n_past_[static_cast<std::size_t>(seq)] = pos0 + static_cast<int>(start) + m;
  }
}

void Context::decode_batch(const std::int32_t* tokens, const int* seqs, std::size_t n) {
  check_tokens(tokens, n);
  if (seqs == nullptr) throw ArgumentError(kOp, "seqs", "is null");
  for (std::size_t i = 0; i < n; ++i) {
    check_seq(seqs[i], "seqs");
    for (std::size_t j = 0; j < i; ++j)
      if (seqs[j] == seqs[i])
        throw ArgumentError(kOp, "seqs", "names sequence " + std::to_string(seqs[i]) +
                                             " twice (one token per sequence; decode() takes several)");
    if (n_past_[static_cast<std::size_t>(seqs[i])] >= options_.n_ctx)
      throw ArgumentError(kOp, "seqs", "sequence " + std::to_string(seqs[i]) + " is full (n_ctx = " +
                                           std::to_string(options_.n_ctx) + ")");
  }
  const ThreadCountScope threads(options_.n_threads);
  const auto n_vocab = static_cast<std::size_t>(model_->info().n_vocab);
  float* logits = logits_for(n);
  all_logits_ = true;
  logits_rows_ = static_cast<int>(n);
  for (std::size_t start = 0; start < n; start += static_cast<std::size_t>(options_.n_batch)) {
    const int m = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(options_.n_batch), n - start));
    for (int r = 0; r < m; ++r) {
      row_seq_[static_cast<std::size_t>(r)] = seqs[start + static_cast<std::size_t>(r)];
      row_pos_[static_cast<std::size_t>(r)] =
          prefix_length() + n_past_[static_cast<std::size_t>(seqs[start + static_cast<std::size_t>(r)])];
    }
    forward(tokens + start, m, 0, logits + start * n_vocab);
    for (int r = 0; r < m; ++r) ++n_past_[static_cast<std::size_t>(row_seq_[static_cast<std::size_t>(r)])];
  }
}

void Context::forward(const std::int32_t* tokens, int m, int first_logits_row, float* logits_out) {
  const ModelInfo& info = model_->info();
  const std::int64_t d = info.n_embd, hd = info.head_dim, ff = info.n_ff;
  const std::int64_t q_out = std::int64_t{info.n_head} * hd;
  const int n_threads = get_num_threads();

  model_->embed(tokens, static_cast<std::size_t>(m), x_.data(), codes_.data());
  // RoPE angles of each row's position, shared by every layer
  const std::int64_t half = hd / 2;
  rope_tables(rope_inv_freq_.data(), half, row_pos_.data(), m, rope_cos_.data(), rope_sin_.data());
  // Where row r's head group g keeps its sequence in a layer's cache (keys blocked by 8 positions, see key_offset;
  // values one row of hd per position).
  const std::int64_t slots = key_slots();
  auto cache_of = [&](float* cache, int r, std::int64_t g) {
    const std::int64_t seq = row_seq_[static_cast<std::size_t>(r)];
    return cache + (seq * info.n_head_kv + g) * slots * hd;
  };

  // Runs quantized GEMM `q` on input [m, k] (or [m, 2k] = [gate | up] with silu_gate), into out (row stride ldo),
  // adding residual (row stride ldo) when given.
  auto run_quantized = [&](const QuantizedLinear& q, const float* input, const float* norm_weight, bool silu_gate,
                           float* out, std::int64_t ldo, const float* residual, int rows_in = -1) {
    const int m_rows = rows_in < 0 ? m : rows_in;
    const std::int64_t k = q.in_features, n = q.out_features;
    const auto& act = q.activation;
    QuantizeOptions options;
    options.bits = act.bits;
    options.symmetric = act.symmetric;
    options.group_size = act.group_size;
    options.silu_gate = silu_gate;
    options.rotate = q.rotate_input;  // after the norm / the gate, before the shift
    if (norm_weight != nullptr) {
      options.rms_norm_weight = view(norm_weight, {k});
      options.rms_norm_eps = info.rms_norm_eps;
    }
    const TensorView x = view(input, {m_rows, silu_gate ? 2 * k : k});
    const TensorView codes = view(codes_.data(), {m_rows, k});
    const TensorView shift = q.input_shift.empty() ? TensorView{} : view(q.input_shift.data(), {k});
    const std::int64_t groups = act.group_size > 0 ? k / act.group_size : 1;
    TensorView a_scale, a_zero_point;
    std::int32_t static_zero_point = act.zero_point;
    float static_step = act.step;
    if (act.dynamic) {
      a_scale = groups > 1 ? view(a_scale_.data(), {m_rows, groups}) : view(a_scale_.data(), {m_rows});
      a_zero_point = groups > 1 ? view(a_zero_point_.data(), {m_rows, groups}) : view(a_zero_point_.data(), {m_rows});
      quantize_dynamic(x, shift, TensorView{}, codes, a_scale, a_zero_point, options);
    } else {
      a_scale = view(&static_step, {1});
      a_zero_point = view(&static_zero_point, {1});
      quantize_static(x, shift, TensorView{}, a_scale, act.symmetric ? TensorView{} : a_zero_point, codes, options);
    }
    // 4-bit codes go to the W4 kernel as int8, as W4A8's do: the CPU kernels widen packed int4 activations to int8
    // before multiplying, so packing them here would only add a pass each way (measured: issue 21's W4A4 prefill).
    GemmArgs args;
    args.a = codes;
    args.a_scale = a_scale;
    if (!act.symmetric) args.a_zero_point = a_zero_point;
    // the weights carry their scales (checked once at load)
    if (!q.bias.empty()) args.bias = view(q.bias.data(), {n});
    args.out = TensorView(out, DType::float32, {m_rows, n}, {ldo, 1});
    if (residual != nullptr) args.residual = TensorView(const_cast<float*>(residual), DType::float32, {m_rows, n}, {ldo, 1});
    gemm(args, q.weights);
  };

  // The output rows of one projection: its columns of a fused GEMM, or its own buffer.
  auto projection_rows = [&](const Block& block, const Projection& p, float* own) -> Rows {
    if (p.quantized) {
      const QuantizedLinear& q = block.fused[static_cast<std::size_t>(p.fused_index)];
      return {fused_out_.data() + p.lo, q.out_features};
    }
    return {own, p.float_linear.out_features};
  };

  // Compute the projections of one input (q/k/v or gate/up) into fused_out_ (quantized) or `own` buffers (float).
  // `norm` is the RMSNorm in front of them. Fused groups whose outputs do not fit one buffer run one after another
  // into consecutive columns of fused_out_ (each projection of a group has its own fused index then).
  auto run_group = [&](const Block& block, const std::vector<const Projection*>& members,
                       const std::vector<float*>& own, const std::vector<float>& norm) {
    const bool one_gemm = members.front()->quantized &&
                          std::all_of(members.begin(), members.end(), [&](const Projection* p) {
                            return p->quantized && p->fused_index == members.front()->fused_index;
                          });
    if (one_gemm) {
      const QuantizedLinear& q = block.fused[static_cast<std::size_t>(members.front()->fused_index)];
      run_quantized(q, x_.data(), norm.data(), false, fused_out_.data(), q.out_features, nullptr);
      return std::vector<Rows>{};
    }
    for (int r = 0; r < m; ++r) rms_norm(x_.data() + r * d, norm.data(), info.rms_norm_eps, d, normed_.data() + r * d);
    std::vector<Rows> rows;
    for (std::size_t i = 0; i < members.size(); ++i) {
      const Projection& p = *members[i];
      if (p.quantized) {
        const QuantizedLinear& q = block.fused[static_cast<std::size_t>(p.fused_index)];
        run_quantized(q, normed_.data(), nullptr, false, own[i], q.out_features, nullptr);
        rows.push_back({own[i], q.out_features});
      } else {
        float_linear(p.float_linear, normed_.data(), m, own[i], p.float_linear.out_features, nullptr);
        rows.push_back({own[i], p.float_linear.out_features});
      }
    }
    return rows;
  };

  const auto dot = detail::float_kernels().dot;
  const auto attend = detail::float_kernels().attend;
  const float attn_scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int group = info.n_head / info.n_head_kv;

  // attention work items (see the attention below), the same in every layer
  std::int64_t attention_macs = 0;
  for (int r = 0; r < m; ++r) attention_macs += (row_pos_[static_cast<std::size_t>(r)] + 1) * q_out * 2;
  row_groups_.clear();
  for (int r = 0; r < m;) {
    int end = r + 1;
    while (end < m && end - r < detail::kAttendRows && row_seq_[static_cast<std::size_t>(end)] == row_seq_[static_cast<std::size_t>(r)])
      ++end;
    row_groups_.push_back(r);
    r = end;
  }
  row_groups_.push_back(m);
  const int n_groups = static_cast<int>(row_groups_.size()) - 1;
  const int items = info.n_head * n_groups;

  for (int layer = 0; layer < info.n_layer; ++layer) {
    const Block& block = model_->blocks()[static_cast<std::size_t>(layer)];
    // ---- attention ----
    auto own = run_group(block, {&block.q, &block.k, &block.v}, {q_.data(), k_.data(), v_.data()}, block.attn_norm);
    const Rows q_rows = own.empty() ? projection_rows(block, block.q, q_.data()) : own[0];
    const Rows k_rows = own.empty() ? projection_rows(block, block.k, k_.data()) : own[1];
    const Rows v_rows = own.empty() ? projection_rows(block, block.v, v_.data()) : own[2];
    float* k_cache = k_cache_[static_cast<std::size_t>(layer)].get();
    float* v_cache = v_cache_[static_cast<std::size_t>(layer)].get();
    // RoPE (rotate-half form) on q and k; k and v go to the cache at their positions.
    for (int r = 0; r < m; ++r) {
      const int pos = row_pos_[static_cast<std::size_t>(r)];
      const float* cos_r = rope_cos_.data() + r * half;
      const float* sin_r = rope_sin_.data() + r * half;
      for (int h = 0; h < info.n_head; ++h) {
        float* qh = q_rows.data + r * q_rows.stride + h * hd;
        for (std::int64_t i = 0; i < half; ++i) {
          const float a = qh[i], b = qh[i + half], c = cos_r[i], s = sin_r[i];
          qh[i] = a * c - b * s;
          qh[i + half] = b * c + a * s;
        }
      }
      for (int g = 0; g < info.n_head_kv; ++g) {
        const float* kh = k_rows.data + r * k_rows.stride + g * hd;
        float* dst = cache_of(k_cache, r, g);
        for (std::int64_t i = 0; i < half; ++i) {
          const float a = kh[i], b = kh[i + half], c = cos_r[i], s = sin_r[i];
          dst[detail::key_offset(pos, i, hd)] = a * c - b * s;
          dst[detail::key_offset(pos, i + half, hd)] = b * c + a * s;
        }
        std::memcpy(cache_of(v_cache, r, g) + pos * hd, v_rows.data + r * v_rows.stride + g * hd,
                    static_cast<std::size_t>(hd) * sizeof(float));
      }
    }
    // Causal attention of each row over its sequence's cache up to its position. The work items are (head, group of
    // up to kAttendRows consecutive rows of one sequence): the rows of a group share every key and value load.
    // Threads take items once there is enough work to pay for waking them (a short decode step has not); each item
    // is computed by one thread in a fixed order, so the result does not depend on the thread count. One worker per
    // thread (its own scores scratch) takes items from a shared counter.
    const int workers = attention_macs >= (std::int64_t{1} << 18) ? std::min(n_threads, attention_slots_) : 1;
    std::atomic<int> next_item{0};
    osengine::detail::parallel_for(workers, 1, [&](std::int64_t w0, std::int64_t w1) {
      for (std::int64_t worker = w0; worker < w1; ++worker) {
        float* scores = scores_.data() + static_cast<std::size_t>(worker) * detail::kAttendRows * static_cast<std::size_t>(slots);
        for (int item = next_item.fetch_add(1); item < items; item = next_item.fetch_add(1)) {
          const int h = item / n_groups, first_row = row_groups_[static_cast<std::size_t>(item % n_groups)];
          const int rows = row_groups_[static_cast<std::size_t>(item % n_groups) + 1] - first_row;
          const int g = h / group;
          const float* q[detail::kAttendRows];
          float* out[detail::kAttendRows];
          int n_keys[detail::kAttendRows];
          for (int i = 0; i < rows; ++i) {
            const int r = first_row + i;
            q[i] = q_rows.data + r * q_rows.stride + h * hd;
            out[i] = attn_.data() + r * q_out + h * hd;
            n_keys[i] = row_pos_[static_cast<std::size_t>(r)] + 1;
          }
          attend(q, n_keys, rows, cache_of(k_cache, first_row, g), cache_of(v_cache, first_row, g), hd, attn_scale,
                 scores, slots, out);
        }
      }
    });
    // o_proj with the residual add: y = x + attn W_o^T
    if (block.o.quantized)
      run_quantized(block.fused[static_cast<std::size_t>(block.o.fused_index)], attn_.data(), nullptr, false,
                    y_.data(), d, x_.data());
    else
      float_linear(block.o.float_linear, attn_.data(), m, y_.data(), d, x_.data());
    std::swap(x_, y_);

    // ---- MLP ----
    const bool gate_fused = block.gate.quantized && block.up.quantized && block.gate.fused_index == block.up.fused_index;
    auto own_mlp = run_group(block, {&block.gate, &block.up}, {hidden_.data(), up_.data()}, block.mlp_norm);
    if (gate_fused && block.down.quantized) {
      // down_proj's quantization computes silu(gate) * up from the fused [gate | up] output
      run_quantized(block.fused[static_cast<std::size_t>(block.down.fused_index)], fused_out_.data(), nullptr, true,
                    y_.data(), d, x_.data());
    } else {
      const Rows gate_rows = own_mlp.empty() ? projection_rows(block, block.gate, hidden_.data()) : own_mlp[0];
      const Rows up_rows = own_mlp.empty() ? projection_rows(block, block.up, up_.data()) : own_mlp[1];
      for (int r = 0; r < m; ++r)
        for (std::int64_t i = 0; i < ff; ++i)
          normed_[static_cast<std::size_t>(r * ff + i)] =
              silu(gate_rows.data[r * gate_rows.stride + i]) * up_rows.data[r * up_rows.stride + i];
      if (block.down.quantized)
        run_quantized(block.fused[static_cast<std::size_t>(block.down.fused_index)], normed_.data(), nullptr, false,
                      y_.data(), d, x_.data());
      else
        float_linear(block.down.float_linear, normed_.data(), m, y_.data(), d, x_.data());
    }
    std::swap(x_, y_);
  }

  // final norm and lm_head for rows first_logits_row .. m - 1
  const int first = first_logits_row;
  const int rows = m - first;
  if (rows <= 0) return;
  const std::int64_t n_vocab = info.n_vocab;
  float* out = logits_out;
  if (const QuantizedLinear* head = model_->quantized_lm_head()) {
    // lm_head on the engine: its quantization applies the final RMSNorm
    run_quantized(*head, x_.data() + first * d, model_->final_norm().data(), false, out, n_vocab, nullptr, rows);
    return;
  }
  for (int r = first; r < m; ++r)
    rms_norm(x_.data() + r * d, model_->final_norm().data(), info.rms_norm_eps, d, normed_.data() + (r - first) * d);
  const std::vector<float>& head = model_->lm_head();
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (std::int64_t j = 0; j < n_vocab; ++j) {
    const float* w = head.data() + j * d;
    for (int r = 0; r < rows; ++r) {
      out[r * n_vocab + j] = dot(normed_.data() + r * d, w, d);
    }
  }
}

Sampler::Sampler(const Options& options) : options_(options), rng_(options.seed) {
  if (!(options_.temperature >= 0.0f)) throw ArgumentError("Sampler", "temperature", "must be >= 0");
  if (options_.top_k < 0) throw ArgumentError("Sampler", "top_k", "must be >= 0");
  if (!(options_.top_p > 0.0f && options_.top_p <= 1.0f)) throw ArgumentError("Sampler", "top_p", "must lie in (0, 1]");
}

std::int32_t Sampler::sample(const float* logits, int n_vocab) {
  if (logits == nullptr || n_vocab <= 0) throw ArgumentError("Sampler", "logits", "is empty");
  if (options_.temperature == 0.0f) {
    int best = 0;  // the first maximum, as argmax
    for (int i = 1; i < n_vocab; ++i)
      if (logits[i] > logits[best]) best = i;
    return best;
  }
  candidates_.resize(static_cast<std::size_t>(n_vocab));
  for (int i = 0; i < n_vocab; ++i) candidates_[static_cast<std::size_t>(i)] = {logits[i] / options_.temperature, i};
  std::size_t keep = candidates_.size();
  if (options_.top_k > 0 && static_cast<std::size_t>(options_.top_k) < keep) keep = static_cast<std::size_t>(options_.top_k);
  auto by_score = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  std::partial_sort(candidates_.begin(), candidates_.begin() + static_cast<std::ptrdiff_t>(keep), candidates_.end(), by_score);
  candidates_.resize(keep);
  const float top = candidates_.front().first;
  double total = 0.0;
  for (auto& c : candidates_) {
    c.first = std::exp(c.first - top);
    total += c.first;
  }
  if (options_.top_p < 1.0f) {
    double cumulative = 0.0;
    std::size_t cut = candidates_.size();
    for (std::size_t i = 0; i < candidates_.size(); ++i) {
      cumulative += candidates_[i].first / total;
      if (cumulative >= options_.top_p) {
        cut = i + 1;
        break;
      }
    }
    candidates_.resize(cut);
    total = 0.0;
    for (const auto& c : candidates_) total += c.first;
  }
  double u = std::uniform_real_distribution<double>(0.0, total)(rng_);
  for (const auto& c : candidates_) {
    u -= c.first;
    if (u <= 0.0) return c.second;
  }
  return candidates_.back().second;
}

std::vector<std::int32_t> generate(Context& context, const std::vector<std::int32_t>& prompt, int max_new_tokens,
                                   Sampler& sampler, const std::function<bool(std::int32_t)>& on_token) {
  if (max_new_tokens < 0) throw ArgumentError("generate", "max_new_tokens", "must be >= 0");
  std::vector<std::int32_t> out;
  if (max_new_tokens == 0) return out;
  const ModelInfo& info = context.model().info();
  context.decode(prompt);
  for (int step = 0; step < max_new_tokens; ++step) {
    const std::int32_t token = sampler.sample(context.logits(), info.n_vocab);
    out.push_back(token);
    const bool go_on = !on_token || on_token(token);
    if (!go_on || token == info.eos_token_id || step + 1 == max_new_tokens) break;
    context.decode(&token, 1);
  }
  return out;
}

}  // namespace osengine::runtime
