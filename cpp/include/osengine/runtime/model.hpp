// A quantized model loaded from the folder `osengine quantize --out DIR` writes (checkpoint format version 2-4):
// immutable once loaded, shareable by several contexts and threads.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "osengine/packed_weights.hpp"
#include "osengine/quantize.hpp"

namespace osengine::runtime {

// The hyperparameters the forward pass needs (from the folder's config.json) and the quantization recipe's name.
struct ModelInfo {
  std::string architecture;  // "llama", "mistral", "qwen2"
  int n_layer = 0;
  int n_embd = 0;            // hidden size
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  int n_ff = 0;              // intermediate size of the MLP
  int n_vocab = 0;
  int n_ctx_train = 0;       // max_position_embeddings
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.0f;
  bool tied_embeddings = false;
  std::int32_t bos_token_id = -1;  // -1: not given
  std::int32_t eos_token_id = -1;
  std::string recipe;        // e.g. "w8a8-static"
  // Token ids every sequence runs behind (osengine.json prefix, format 4: the outlier tokens PrefixQuant keeps in
  // full precision). Their keys and values are stored (Block::prefix_keys / prefix_values) and stand at positions
  // 0 .. prefix.size() - 1 of every sequence's KV cache; a sequence's own tokens follow them.
  std::vector<std::int32_t> prefix;
};

// How one linear layer's input is quantized (from the manifest's activation spec and calibration).
struct ActivationQuant {
  int bits = 8;
  bool symmetric = true;     // false also for full-range symmetric codes (asymmetric codes with zero point 0)
  bool dynamic = false;      // per token (per row), or per token and group
  std::int64_t group_size = 0;
  float step = 0.0f;         // static only
  std::int32_t zero_point = 0;  // static only, in the engine's signed code range
};

// A quantized linear y = x W^T + b; several layers that read one input (q/k/v, gate/up) may be one fused Linear
// over their concatenated weights.
struct QuantizedLinear {
  std::string name;
  std::int64_t in_features = 0, out_features = 0;
  int weight_bits = 8;
  std::int64_t weight_group_size = 0;  // 0: one scale per output channel
  PackedWeights weights;            // carries its scales: weights.weight_scales(), [out] or [out, in / group]
  std::vector<float> bias;          // [out] or empty (carries the folded OS+ shift W z)
  std::vector<float> input_shift;   // [in] or empty: the runtime shift subtracted before quantization
  // The input is rotated online, x H / sqrt(in) before the shift (manifest "input_rotation": "hadamard"; the weight
  // holds W H / sqrt(in)): QuantizeOptions::rotate.
  bool rotate_input = false;
  ActivationQuant activation;
};

// A linear layer the recipe keeps in floating point.
struct FloatLinear {
  std::string name;
  std::int64_t in_features = 0, out_features = 0;
  std::vector<float> weight;  // [out, in]
  std::vector<float> bias;    // [out] or empty
};

// One projection: quantized (possibly a member of a fused group) or floating point.
struct Projection {
  bool quantized = false;
  int fused_index = -1;           // quantized: index into Block::fused; the member's output columns [lo, hi)
  std::int64_t lo = 0, hi = 0;
  FloatLinear float_linear;       // when not quantized
};

struct Block {
  std::vector<float> attn_norm, mlp_norm;  // RMSNorm weights [n_embd]
  std::vector<QuantizedLinear> fused;      // the block's quantized GEMMs (q/k/v fused when they can be, etc.)
  Projection q, k, v, o, gate, up, down;
  // The prefix's keys (after RoPE) and values, [n_head_kv][prefix length][head_dim]; empty without a prefix.
  std::vector<float> prefix_keys, prefix_values;
};

// Choices made when a folder is loaded (the folder itself is never changed).
struct ModelOptions {
  // Run lm_head on the engine (int8 symmetric per-channel weights, int8 asymmetric per-token dynamic activations)
  // and keep the token embedding table in int8 (one scale per row; a tied pair shares one int8 copy), as the Python
  // engine does with convert_to_engine(quantize_embeddings=True). Not part of the recipe (which keeps them in
  // floating point): faster decoding (lm_head reads a quarter of the bytes) for a small accuracy cost.
  bool quantize_embeddings = false;
};

class Model {
 public:
  // Load and validate the folder `dir` (osengine.json, config.json, model.safetensors); weights are packed once for
  // the fastest CPU backend. Throws LoadError naming the folder and the problem.
  static std::shared_ptr<const Model> load(const std::string& dir, const ModelOptions& options = {});

  const ModelInfo& info() const { return info_; }
  const std::vector<Block>& blocks() const { return blocks_; }
  const ModelOptions& options() const { return options_; }
  // Write the embedding of each of tokens[0 .. n) to out[i * n_embd ..] (ids must lie in [0, n_vocab));
  // code_scratch holds n * n_embd bytes (used for int8 tables).
  void embed(const std::int32_t* tokens, std::size_t n, float* out, std::int8_t* code_scratch) const;
  const std::vector<float>& final_norm() const { return final_norm_; }
  // The floating-point lm_head weight [n_vocab, n_embd] (the embeddings when tied); empty with quantize_embeddings.
  const std::vector<float>& lm_head() const { return tied_lm_head_ ? embeddings_ : lm_head_; }
  // lm_head on the engine with quantize_embeddings; null otherwise.
  const QuantizedLinear* quantized_lm_head() const { return quantized_lm_head_ ? &*quantized_lm_head_ : nullptr; }
  // Bytes held by the model's weights (packed GEMM layouts and floating-point tensors).
  std::size_t nbytes() const;
  // Bytes of weights one decoding step reads (every GEMM's packed weights and per-channel parameters, the norms and
  // lm_head; one embedding row is left out): over the machine's read bandwidth, the bound on tokens per second.
  std::size_t bytes_per_token() const;

 private:
  void quantize_embeddings();  // the quantize_embeddings option, after the floating-point tensors are read

  ModelInfo info_;
  ModelOptions options_;
  std::vector<Block> blocks_;
  std::vector<float> embeddings_, final_norm_, lm_head_;  // floating point (embeddings_ empty when in int8)
  bool tied_lm_head_ = false;
  std::optional<QuantizedLinear> quantized_lm_head_;
  // int8 embedding table [n_vocab, n_embd] with one scale per row; empty when tied (the rows are read back from
  // the quantized lm_head's packed weights and scales: one copy).
  std::vector<std::int8_t> embedding_codes_;
  std::vector<float> embedding_row_scale_;
};

}  // namespace osengine::runtime
