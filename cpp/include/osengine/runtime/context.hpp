// A Context runs a Model: it owns the KV cache, the scratch buffers (sized once, when it is created: decoding
// allocates nothing) and the logits. One caller thread at a time per Context; several Contexts may share one Model.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "osengine/runtime/model.hpp"

namespace osengine::runtime {

struct ContextOptions {
  int n_ctx = 2048;    // positions the KV cache holds, per sequence
  int n_batch = 512;   // tokens decoded per forward pass (longer inputs are split)
  int n_threads = 0;   // threads of the CPU kernels (0: what osengine::get_num_threads() says)
  int n_seq = 1;       // sequences the context holds (decode_batch advances several in one pass)
};

class Context {
 public:
  explicit Context(std::shared_ptr<const Model> model, const ContextOptions& options = {});

  // Run `n` tokens of sequence `seq` at positions n_past(seq) .. n_past(seq) + n - 1 and append them to its KV
  // cache. The logits of the last token (of every token with all_logits) are then available. ArgumentError for ids
  // outside the vocabulary, a sequence outside [0, n_seq) or a full context (nothing is changed then).
  void decode(const std::int32_t* tokens, std::size_t n, bool all_logits = false, int seq = 0);
  void decode(const std::vector<std::int32_t>& tokens, bool all_logits = false, int seq = 0) {
    decode(tokens.data(), tokens.size(), all_logits, seq);
  }
  // One new token for each of n different sequences in one forward pass (the weights are read once for all of
  // them): tokens[i] goes to sequence seqs[i] at position n_past(seqs[i]); its logits are then logits(i).
  void decode_batch(const std::int32_t* tokens, const int* seqs, std::size_t n);
  // [n_vocab] logits of the i-th token of the last decode call (-1: its last token; others need all_logits, or
  // decode_batch).
  const float* logits(int i = -1) const;
  int n_past(int seq = 0) const;
  const Model& model() const { return *model_; }
  const ContextOptions& options() const { return options_; }
  // Forget a sequence's KV cache (kv_clear; -1: every sequence) or every position from `pos` on (kv_truncate:
  // decoding goes on from there). Positions count the sequence's own tokens: a model's prefix (ModelInfo::prefix)
  // stays in front of every sequence, whatever is cleared.
  void kv_clear(int seq = -1);
  void kv_truncate(int pos, int seq = 0);

 private:
  // Runs tokens[0 .. m), row r in sequence row_seq_[r] at position row_pos_[r] (each sequence's rows in position
  // order, right after its cached ones); writes the logits of rows first_logits_row .. m - 1 to logits_out.
  void forward(const std::int32_t* tokens, int m, int first_logits_row, float* logits_out);
  void check_tokens(const std::int32_t* tokens, std::size_t n) const;
  void check_seq(int seq, const char* argument) const;
  float* logits_for(std::size_t rows);

  // Floats left untouched until written: a long context's KV cache takes memory only as it fills.
  struct FloatBuffer {
    std::unique_ptr<float[]> data;
    void allocate(std::size_t n) { data.reset(new float[n]); }
    float* get() const { return data.get(); }
  };

  std::shared_ptr<const Model> model_;
  ContextOptions options_;
  std::vector<int> n_past_;  // per sequence
  // KV cache: per layer [n_seq][n_head_kv][key_slots()][head_dim]; the keys in blocks of 8 positions transposed
  // ([key_slots() / 8][head_dim][8], the attention kernel's layout), the values one row per position.
  std::vector<FloatBuffer> k_cache_, v_cache_;
  // The model's prefix (ModelInfo::prefix) fills positions 0 .. prefix_length() - 1 of every sequence's cache; a
  // sequence's own position p lies at cache position prefix_length() + p.
  int prefix_length() const { return static_cast<int>(model_->info().prefix.size()); }
  int key_slots() const { return (prefix_length() + options_.n_ctx + 7) / 8 * 8; }
  void write_prefix();
  int attention_slots_ = 1;        // threads the attention scratch has room for
  std::vector<int> row_groups_;    // first row of each attention row group, then m
  // scratch, sized for n_batch tokens
  std::vector<int> row_seq_, row_pos_;
  std::vector<float> rope_inv_freq_, rope_cos_, rope_sin_;
  std::vector<float> x_, y_, normed_, fused_out_, q_, k_, v_, attn_, hidden_, up_, scores_, logits_;
  std::vector<std::int8_t> codes_;
  std::vector<float> a_scale_;
  std::vector<std::int32_t> a_zero_point_;
  int logits_rows_ = 0;
  bool all_logits_ = false;
};

// Token selection from logits: greedy (temperature 0), or sampling with temperature, top-k and top-p from a seeded
// generator (the same seed gives the same tokens).
class Sampler {
 public:
  struct Options {
    float temperature = 0.0f;  // 0: greedy
    int top_k = 0;             // 0: all tokens
    float top_p = 1.0f;        // 1: no nucleus cut
    std::uint64_t seed = 0;
  };
  Sampler() : Sampler(Options{}) {}
  explicit Sampler(const Options& options);
  std::int32_t sample(const float* logits, int n_vocab);

 private:
  Options options_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, std::int32_t>> candidates_;
};

// Decode `prompt`, then up to `max_new_tokens` tokens, each passed to on_token (return false to stop). Stops at the
// model's end-of-sequence token (included in the result). Returns the new tokens.
std::vector<std::int32_t> generate(Context& context, const std::vector<std::int32_t>& prompt, int max_new_tokens,
                                   Sampler& sampler, const std::function<bool(std::int32_t)>& on_token = {});

}  // namespace osengine::runtime
