// A quantized model loaded from the folder `osengine quantize --out DIR` writes (checkpoint format version 2):
// immutable once loaded, shareable by several contexts and threads.
#pragma once
#include <cstdint>
#include <memory>
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
  PackedWeights weights;
  std::vector<float> weight_scale;  // [out] or [out, in / group]
  std::vector<float> bias;          // [out] or empty (carries the folded OS+ shift W z)
  std::vector<float> input_shift;   // [in] or empty: the runtime shift subtracted before quantization
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
};

class Model {
 public:
  // Load and validate the folder `dir` (osengine.json, config.json, model.safetensors); weights are packed once for
  // the fastest CPU backend. Throws LoadError naming the folder and the problem.
  static std::shared_ptr<const Model> load(const std::string& dir);

  const ModelInfo& info() const { return info_; }
  const std::vector<Block>& blocks() const { return blocks_; }
  const std::vector<float>& token_embeddings() const { return embeddings_; }  // [n_vocab, n_embd]
  const std::vector<float>& final_norm() const { return final_norm_; }
  // The lm_head weight [n_vocab, n_embd]: the embeddings when tied.
  const std::vector<float>& lm_head() const { return tied_lm_head_ ? embeddings_ : lm_head_; }
  // Bytes held by the model's weights (packed GEMM layouts and floating-point tensors).
  std::size_t nbytes() const;

 private:
  ModelInfo info_;
  std::vector<Block> blocks_;
  std::vector<float> embeddings_, final_norm_, lm_head_;
  bool tied_lm_head_ = false;
};

}  // namespace osengine::runtime
