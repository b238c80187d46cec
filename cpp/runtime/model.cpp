// Loading a quantized folder: validate the manifest, the config and every tensor, then pack the weights once.
#include "osengine/runtime/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "osengine/errors.hpp"
#include "osengine/hadamard.hpp"
#include "osengine/int4.hpp"
#include "osengine/runtime/errors.hpp"
#include "safetensors.hpp"

namespace osengine::runtime {
namespace {

using nlohmann::json;
using detail::SafetensorsFile;
using detail::StorageType;
using detail::TensorEntry;
using detail::shape_text;

constexpr int kNewestFormatVersion = 4;

class Loader {
 public:
  explicit Loader(std::string dir) : dir_(std::move(dir)) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw LoadError("osengine model folder '" + dir_ + "': " + what);
  }

  json read_json(const std::string& file) const {
    std::ifstream in(dir_ + "/" + file);
    if (!in) fail(file + " is missing (is this a folder written by `osengine quantize --out`?)");
    try {
      return json::parse(in);
    } catch (const json::exception& e) {
      fail(file + " is not valid JSON (" + e.what() + ")");
    }
  }

  template <typename T>
  T field(const json& object, const std::string& key, const std::string& where) const {
    if (!object.is_object() || !object.contains(key)) fail(where + " has no field '" + key + "'");
    try {
      return object.at(key).get<T>();
    } catch (const json::exception&) {
      fail(where + ": field '" + key + "' has the wrong type (" + object.at(key).dump() + ")");
    }
  }

  template <typename T>
  T field_or(const json& object, const std::string& key, T fallback, const std::string& where) const {
    if (!object.contains(key) || object.at(key).is_null()) return fallback;
    return field<T>(object, key, where);
  }

  // A floating-point tensor of `shape` as float32 (stored as F32 or BF16).
  std::vector<float> floats(const SafetensorsFile& file, const std::string& name,
                            const std::vector<std::int64_t>& shape) const {
    const TensorEntry& e = file.entry(name);
    if (e.shape != shape || (e.type != StorageType::f32 && e.type != StorageType::bf16))
      fail("tensor '" + name + "' is " + e.describe() + ", expected F32 or BF16 " + shape_text(shape));
    if (e.type == StorageType::f32) return file.read<float>(e);
    const auto halves = file.read<std::uint16_t>(e);
    std::vector<float> out(halves.size());
    for (std::size_t i = 0; i < halves.size(); ++i) {
      const std::uint32_t bits = static_cast<std::uint32_t>(halves[i]) << 16;
      std::memcpy(&out[i], &bits, 4);
    }
    return out;
  }

  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
};

// The prefix's token ids (osengine.json prefix); a version-3 folder with a prefix lacks its keys and values.
std::vector<std::int32_t> read_prefix(const Loader& loader, const json& manifest, int n_vocab) {
  std::vector<std::int32_t> prefix;
  if (!manifest.contains("prefix")) return prefix;
  const json& ids = manifest["prefix"];
  if (!ids.is_array()) loader.fail("osengine.json: prefix must be a list of token ids");
  for (const json& id : ids) {
    if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() >= n_vocab)
      loader.fail("osengine.json: prefix token ids must be integers in [0, " + std::to_string(n_vocab) + "), got " +
                  id.dump());
    prefix.push_back(id.get<std::int32_t>());
  }
  if (!prefix.empty() && manifest["format_version"].get<int>() < 4)
    loader.fail("the model runs behind a prefix but was written by an osengine that did not store the prefix's keys "
                "and values (format version " + std::to_string(manifest["format_version"].get<int>()) +
                "); quantize it again");
  return prefix;
}

ModelInfo read_info(const Loader& loader, const json& config, const json& manifest) {
  ModelInfo info;
  const std::string where = "config.json";
  info.architecture = loader.field<std::string>(config, "model_type", where);
  if (info.architecture != "llama" && info.architecture != "mistral" && info.architecture != "qwen2")
    loader.fail("config.json: model_type '" + info.architecture +
                "' is not one the native runtime runs (llama, mistral, qwen2); run it from Python "
                "(osengine.load) instead");
  info.n_layer = loader.field<int>(config, "num_hidden_layers", where);
  info.n_embd = loader.field<int>(config, "hidden_size", where);
  info.n_head = loader.field<int>(config, "num_attention_heads", where);
  info.n_head_kv = loader.field_or<int>(config, "num_key_value_heads", info.n_head, where);
  info.n_ff = loader.field<int>(config, "intermediate_size", where);
  info.n_vocab = loader.field<int>(config, "vocab_size", where);
  info.n_ctx_train = loader.field_or<int>(config, "max_position_embeddings", 2048, where);
  if (info.n_layer <= 0 || info.n_embd <= 0 || info.n_head <= 0 || info.n_head_kv <= 0 || info.n_ff <= 0 ||
      info.n_vocab <= 0 || info.n_head % info.n_head_kv != 0)
    loader.fail("config.json: sizes must be positive and num_attention_heads a multiple of num_key_value_heads");
  info.head_dim = loader.field_or<int>(config, "head_dim", info.n_embd / info.n_head, where);
  if (info.head_dim <= 0 || info.head_dim % 2 != 0)
    loader.fail("config.json: head_dim must be positive and even, got " + std::to_string(info.head_dim));
  info.rms_norm_eps = static_cast<float>(loader.field_or<double>(config, "rms_norm_eps", 1e-6, where));
  // transformers 5 writes rope_parameters {rope_theta, rope_type}; older configs rope_theta and rope_scaling
  json rope = config.contains("rope_parameters") && config["rope_parameters"].is_object() ? config["rope_parameters"]
                                                                                           : json::object();
  if (config.contains("rope_scaling") && config["rope_scaling"].is_object()) rope.update(config["rope_scaling"]);
  const auto rope_type = loader.field_or<std::string>(rope, "rope_type", "default", where);
  if (rope_type != "default")
    loader.fail("config.json: rope type '" + rope_type + "' is not supported by the native runtime yet (default only)");
  info.rope_theta = static_cast<float>(
      loader.field_or<double>(rope, "rope_theta", loader.field_or<double>(config, "rope_theta", 10000.0, where),
                              where));
  info.tied_embeddings = loader.field_or<bool>(config, "tie_word_embeddings", false, where);
  info.bos_token_id = loader.field_or<std::int32_t>(config, "bos_token_id", -1, where);
  if (config.contains("eos_token_id") && config["eos_token_id"].is_array()) {
    if (!config["eos_token_id"].empty()) info.eos_token_id = config["eos_token_id"][0].get<std::int32_t>();
  } else {
    info.eos_token_id = loader.field_or<std::int32_t>(config, "eos_token_id", -1, where);
  }
  info.recipe = loader.field_or<std::string>(manifest["recipe"], "name", "custom", "osengine.json recipe");
  info.prefix = read_prefix(loader, manifest, info.n_vocab);
  return info;
}

void check_manifest(const Loader& loader, const json& manifest) {
  const std::string where = "osengine.json";
  if (loader.field_or<std::string>(manifest, "format", "", where) != "osengine-checkpoint")
    loader.fail("osengine.json does not describe an osengine checkpoint");
  const int version = loader.field<int>(manifest, "format_version", where);
  if (version > kNewestFormatVersion)
    loader.fail("format version " + std::to_string(version) + " is newer than this runtime reads (" +
                std::to_string(kNewestFormatVersion) + "); upgrade osengine");
  if (version < 2)
    loader.fail("format version " + std::to_string(version) +
                " stores the quantized weights in floating point; the native runtime reads integer codes "
                "(version 2 or later): rewrite it with `osengine upgrade DIR --out NEW_DIR`");
  if (loader.field_or<std::string>(manifest, "kind", "", where) != "fake-quant")
    loader.fail("osengine.json: kind is not 'fake-quant'");
  if (!manifest.contains("recipe") || !manifest["recipe"].is_object()) loader.fail("osengine.json has no recipe");
  if (loader.field_or<bool>(manifest["recipe"], "bmm_inputs", false, "osengine.json recipe"))
    loader.fail("the recipe quantizes the attention BMM inputs, which the native runtime does not run");
  if (manifest.contains("residual_restores") && !manifest["residual_restores"].empty())
    loader.fail("the model has residual restores (a post-LN encoder), which the native runtime does not run");
  if (!manifest.contains("layers") || !manifest["layers"].is_object()) loader.fail("osengine.json has no layers");
}

ActivationQuant activation_quant(const Loader& loader, const std::string& name, const json& entry) {
  const std::string where = "osengine.json layer '" + name + "' activation";
  const json& spec = entry["activation"];
  ActivationQuant a;
  a.bits = loader.field<int>(spec, "bits", where);
  const bool symmetric = loader.field<bool>(spec, "symmetric", where);
  const bool full_range = loader.field_or<bool>(spec, "full_range", false, where);
  a.dynamic = loader.field<bool>(spec, "dynamic", where);
  const auto granularity = loader.field<std::string>(spec, "granularity", where);
  if (a.bits < 2 || a.bits > 8) loader.fail(where + ": bits must be 2..8, got " + std::to_string(a.bits));
  // Full-range symmetric codes (down to -2^(b-1)) are the engine's asymmetric codes with zero point 0.
  a.symmetric = symmetric && !full_range;
  if (granularity == "per-tensor" && !a.dynamic) {
    if (!entry.contains("activation_step"))
      loader.fail(where + ": the static quantizer was never calibrated (no activation_step)");
    a.step = static_cast<float>(loader.field<double>(entry, "activation_step", where));
    const int zero_point = loader.field<int>(entry, "activation_zero_point", where);
    a.zero_point = zero_point - (symmetric ? 0 : (1 << (a.bits - 1)));
    if (!(a.step > 0.0f) || !std::isfinite(a.step)) loader.fail(where + ": activation_step must be positive");
  } else if (granularity == "per-token" && a.dynamic) {
  } else if (granularity == "per-group" && a.dynamic) {
    a.group_size = loader.field<std::int64_t>(spec, "group_size", where);
  } else {
    loader.fail(where + ": " + std::string(a.dynamic ? "dynamic " : "static ") + granularity +
                " activations are not run by the engine (static per-tensor, dynamic per-token or per-group)");
  }
  return a;
}

// A quantized linear as read from the file: its integer codes [out, in] are packed once its fusion is known.
struct LoadedLinear {
  QuantizedLinear layer;
  std::vector<std::int8_t> codes;
  std::vector<float> scale;  // [out] or [out, in / group]
};

// Pack codes [n, k] for the engine (int8, or int4 two per byte) with weight groups of group_size (0: none), with
// their scales ([n] or [n, k / group_size]).
PackedWeights pack_codes(const std::vector<std::int8_t>& codes, const std::vector<float>& scale, std::int64_t n,
                         std::int64_t k, int weight_bits, std::int64_t group_size) {
  const std::int64_t groups = static_cast<std::int64_t>(scale.size()) / n;
  const TensorView scale_view = groups > 1 ? view(scale.data(), {n, groups}) : view(scale.data(), {n});
  if (weight_bits == 8) return PackedWeights::pack(view(codes.data(), {n, k}), 8, group_size, Backend::automatic, scale_view);
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(n * k / 2));
  pack_int4(view(codes.data(), {n, k}), view(packed.data(), {n, k / 2}));
  return PackedWeights::pack(view(packed.data(), {n, k / 2}), 4, group_size, Backend::automatic, scale_view);
}

LoadedLinear quantized_linear(const Loader& loader, const SafetensorsFile& file, const std::string& name,
                              const json& entry, std::int64_t in, std::int64_t out) {
  const std::string where = "osengine.json layer '" + name + "'";
  if (loader.field_or<std::string>(entry, "weight_storage", "float", where) != "codes")
    loader.fail(where + ": the weight is stored in floating point, not as integer codes");
  const json& spec = entry["weight"];
  QuantizedLinear q;
  q.name = name;
  q.in_features = in;
  q.out_features = out;
  const int bits = loader.field<int>(spec, "bits", where + " weight");
  if (!loader.field<bool>(spec, "symmetric", where + " weight"))
    loader.fail(where + ": asymmetric weights are not run by the engine");
  if (bits < 2 || bits > 8) loader.fail(where + ": weight bits must be 2..8");
  q.weight_bits = bits <= 4 ? 4 : 8;
  const auto granularity = loader.field<std::string>(spec, "granularity", where + " weight");
  std::int64_t group = 0, groups = 1;
  if (granularity == "per-group") {
    group = loader.field<std::int64_t>(spec, "group_size", where + " weight");
    if (group <= 0 || in % group != 0) loader.fail(where + ": weight group_size must divide " + std::to_string(in));
    groups = in / group;
  } else if (granularity != "per-channel" && granularity != "per-tensor") {
    loader.fail(where + ": weight granularity '" + granularity + "' is not run by the engine");
  }
  q.activation = activation_quant(loader, name, entry);
  if (q.activation.group_size != 0 && q.activation.group_size != group)
    loader.fail(where + ": per-group activations need weights with the same group size");

  const auto& codes_entry = file.expect(name + ".weight_codes", StorageType::i8, {out, in});
  auto codes = file.read<std::int8_t>(codes_entry);
  const int qmax = (1 << (bits - 1)) - 1;
  for (std::int8_t c : codes)
    if (c < -qmax || c > qmax)
      loader.fail("tensor '" + name + ".weight_codes' holds " + std::to_string(int(c)) + ", outside [-" +
                  std::to_string(qmax) + ", " + std::to_string(qmax) + "]");
  const std::vector<std::int64_t> scale_shape =
      granularity == "per-group" ? std::vector<std::int64_t>{out, groups}
                                 : (granularity == "per-tensor" ? std::vector<std::int64_t>{1}
                                                                : std::vector<std::int64_t>{out});
  std::vector<float> scale = file.read<float>(file.expect(name + ".weight_scale", StorageType::f32, scale_shape));
  for (float s : scale)
    if (!std::isfinite(s) || !(s > 0.0f)) loader.fail("tensor '" + name + ".weight_scale' holds a non-positive value");
  if (granularity == "per-tensor") scale.assign(static_cast<std::size_t>(out), scale[0]);
  if (loader.field_or<bool>(entry, "bias", false, where)) q.bias = loader.floats(file, name + ".bias", {out});
  if (loader.field_or<bool>(entry, "runtime_shift", false, where))
    q.input_shift = loader.floats(file, name + ".input_shift", {in});
  // "input_rotation": null or absent (folders written before online rotations) = none; "hadamard" = x H / sqrt(in)
  if (entry.contains("input_rotation") && !entry["input_rotation"].is_null()) {
    const json& rotation = entry["input_rotation"];
    if (!rotation.is_string() || rotation.get<std::string>() != "hadamard")
      loader.fail(where + ": input_rotation " + rotation.dump() +
                  " is not one the native runtime runs (null or \"hadamard\")");
    if (!is_hadamard_order(in))
      loader.fail(where + ": input_rotation \"hadamard\" needs a Hadamard order of inputs (m * 2^k with m = 1 or a "
                          "Paley order <= 256), got " + std::to_string(in));
    q.rotate_input = true;
  }

  q.weight_group_size = group;
  return {std::move(q), std::move(codes), std::move(scale)};
}

FloatLinear float_linear(const Loader& loader, const SafetensorsFile& file, const std::string& name, std::int64_t in,
                         std::int64_t out) {
  FloatLinear f;
  f.name = name;
  f.in_features = in;
  f.out_features = out;
  f.weight = loader.floats(file, name + ".weight", {out, in});
  if (file.contains(name + ".bias")) f.bias = loader.floats(file, name + ".bias", {out});
  return f;
}

bool same_input_quantization(const QuantizedLinear& a, const QuantizedLinear& b) {
  const auto& x = a.activation;
  const auto& y = b.activation;
  return a.in_features == b.in_features && a.weight_bits == b.weight_bits &&
         a.weight_group_size == b.weight_group_size && x.bits == y.bits && x.symmetric == y.symmetric &&
         x.dynamic == y.dynamic && x.group_size == y.group_size && x.step == y.step && x.zero_point == y.zero_point &&
         a.input_shift == b.input_shift && a.rotate_input == b.rotate_input;
}

// Pack one layer, or one GEMM over the members' concatenated weights (rows in member order).
QuantizedLinear pack_fused(const Loader& loader, std::vector<LoadedLinear>& members) {
  if (members.size() == 1) {
    QuantizedLinear& q = members.front().layer;
    try {
      q.weights = pack_codes(members.front().codes, members.front().scale, q.out_features, q.in_features,
                             q.weight_bits, q.weight_group_size);
    } catch (const std::exception& e) {
      loader.fail("layer '" + q.name + "' cannot be packed: " + e.what());
    }
    return std::move(q);
  }
  const QuantizedLinear& first = members.front().layer;
  QuantizedLinear fused;
  fused.in_features = first.in_features;
  fused.weight_bits = first.weight_bits;
  fused.weight_group_size = first.weight_group_size;
  fused.activation = first.activation;
  fused.input_shift = first.input_shift;
  fused.rotate_input = first.rotate_input;
  const bool any_bias =
      std::any_of(members.begin(), members.end(), [](const LoadedLinear& m) { return !m.layer.bias.empty(); });
  std::vector<std::int8_t> codes;
  std::vector<float> scale;
  for (const auto& loaded : members) {
    const QuantizedLinear& m = loaded.layer;
    fused.name += (fused.name.empty() ? "" : "+") + m.name;
    codes.insert(codes.end(), loaded.codes.begin(), loaded.codes.end());
    scale.insert(scale.end(), loaded.scale.begin(), loaded.scale.end());
    if (any_bias) {
      if (m.bias.empty())
        fused.bias.insert(fused.bias.end(), static_cast<std::size_t>(m.out_features), 0.0f);
      else
        fused.bias.insert(fused.bias.end(), m.bias.begin(), m.bias.end());
    }
    fused.out_features += m.out_features;
  }
  try {
    fused.weights = pack_codes(codes, scale, fused.out_features, fused.in_features, fused.weight_bits,
                               fused.weight_group_size);
  } catch (const std::exception& e) {
    loader.fail("layer '" + fused.name + "' cannot be packed: " + e.what());
  }
  return fused;
}

// Symmetric MinMax int8 codes with one scale per row of a [rows, cols] float matrix, as the Python front end makes
// them (osengine.quant.spec.symmetric_weight_codes): scale = max|row| / 127 (at least 1e-8), code = round(w / scale)
// with ties to even.
void row_codes(const std::vector<float>& w, std::int64_t rows, std::int64_t cols, std::vector<std::int8_t>& codes,
               std::vector<float>& scale) {
  codes.resize(static_cast<std::size_t>(rows * cols));
  scale.resize(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row = w.data() + r * cols;
    float amax = 0.0f;
    for (std::int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(row[c]));
    const float s = std::max(amax / 127.0f, 1e-8f);
    scale[static_cast<std::size_t>(r)] = s;
    for (std::int64_t c = 0; c < cols; ++c)
      codes[static_cast<std::size_t>(r * cols + c)] =
          static_cast<std::int8_t>(std::clamp(std::nearbyint(row[c] / s), -127.0f, 127.0f));
  }
}

}  // namespace

std::shared_ptr<const Model> Model::load(const std::string& dir, const ModelOptions& options) {
  Loader loader(dir);
  const json manifest = loader.read_json("osengine.json");
  check_manifest(loader, manifest);
  const json config = loader.read_json("config.json");
  auto model = std::shared_ptr<Model>(new Model());
  model->options_ = options;
  model->info_ = read_info(loader, config, manifest);
  const ModelInfo& info = model->info_;
  SafetensorsFile file = [&] {
    try {
      return SafetensorsFile::open(dir + "/model.safetensors");
    } catch (const LoadError& e) {
      loader.fail(e.what());
    }
  }();
  const json& layers = manifest["layers"];
  const std::int64_t d = info.n_embd, ff = info.n_ff;
  const std::int64_t q_out = std::int64_t{info.n_head} * info.head_dim;
  const std::int64_t kv_out = std::int64_t{info.n_head_kv} * info.head_dim;

  try {
    model->embeddings_ = loader.floats(file, "model.embed_tokens.weight", {info.n_vocab, d});
    model->final_norm_ = loader.floats(file, "model.norm.weight", {d});
    const bool lm_head_tied = manifest.contains("tied") && manifest["tied"].contains("lm_head.weight");
    model->tied_lm_head_ = lm_head_tied || (info.tied_embeddings && !file.contains("lm_head.weight"));
    if (!model->tied_lm_head_) model->lm_head_ = loader.floats(file, "lm_head.weight", {info.n_vocab, d});
    if (options.quantize_embeddings) model->quantize_embeddings();

    for (int i = 0; i < info.n_layer; ++i) {
      const std::string prefix = "model.layers." + std::to_string(i) + ".";
      Block block;
      block.attn_norm = loader.floats(file, prefix + "input_layernorm.weight", {d});
      block.mlp_norm = loader.floats(file, prefix + "post_attention_layernorm.weight", {d});
      if (!info.prefix.empty()) {
        const std::vector<std::int64_t> shape = {info.n_head_kv, static_cast<std::int64_t>(info.prefix.size()),
                                                 info.head_dim};
        const std::string stored = "osengine.prefix." + std::to_string(i) + ".";
        block.prefix_keys = loader.floats(file, stored + "key", shape);
        block.prefix_values = loader.floats(file, stored + "value", shape);
        for (const auto* values : {&block.prefix_keys, &block.prefix_values})
          if (!std::all_of(values->begin(), values->end(), [](float x) { return std::isfinite(x); }))
            loader.fail("tensor '" + stored + (values == &block.prefix_keys ? "key" : "value") +
                        "' holds non-finite values");
      }
      struct Spec {
        Projection* projection;
        std::string name;
        std::int64_t in, out;
      };
      const std::vector<std::vector<Spec>> groups = {
          {{&block.q, prefix + "self_attn.q_proj", d, q_out},
           {&block.k, prefix + "self_attn.k_proj", d, kv_out},
           {&block.v, prefix + "self_attn.v_proj", d, kv_out}},
          {{&block.o, prefix + "self_attn.o_proj", q_out, d}},
          {{&block.gate, prefix + "mlp.gate_proj", d, ff}, {&block.up, prefix + "mlp.up_proj", d, ff}},
          {{&block.down, prefix + "mlp.down_proj", ff, d}},
      };
      for (const auto& group : groups) {
        std::vector<LoadedLinear> quantized;
        std::vector<const Spec*> quantized_specs;
        for (const auto& spec : group) {
          if (layers.contains(spec.name)) {
            quantized.push_back(quantized_linear(loader, file, spec.name, layers[spec.name], spec.in, spec.out));
            quantized_specs.push_back(&spec);
          } else {
            spec.projection->quantized = false;
            spec.projection->float_linear = float_linear(loader, file, spec.name, spec.in, spec.out);
          }
        }
        const bool fusable = quantized.size() == group.size() && quantized.size() > 1 &&
                             std::all_of(quantized.begin(), quantized.end(), [&](const LoadedLinear& m) {
                               return same_input_quantization(m.layer, quantized.front().layer);
                             });
        if (fusable) {
          const int index = static_cast<int>(block.fused.size());
          std::int64_t lo = 0;
          for (std::size_t m = 0; m < quantized.size(); ++m) {
            Projection* p = quantized_specs[m]->projection;
            p->quantized = true;
            p->fused_index = index;
            p->lo = lo;
            p->hi = lo + quantized[m].layer.out_features;
            lo = p->hi;
          }
          block.fused.push_back(pack_fused(loader, quantized));
        } else {
          for (std::size_t m = 0; m < quantized.size(); ++m) {
            Projection* p = quantized_specs[m]->projection;
            p->quantized = true;
            p->fused_index = static_cast<int>(block.fused.size());
            p->lo = 0;
            p->hi = quantized[m].layer.out_features;
            std::vector<LoadedLinear> one;
            one.push_back(std::move(quantized[m]));
            block.fused.push_back(pack_fused(loader, one));
          }
        }
      }
      model->blocks_.push_back(std::move(block));
    }
  } catch (const LoadError& e) {
    const std::string what = e.what();
    if (what.rfind("osengine model folder", 0) == 0) throw;
    loader.fail(what);
  }
  return model;
}

void Model::quantize_embeddings() {
  const std::int64_t n_vocab = info_.n_vocab, d = info_.n_embd;
  QuantizedLinear head;
  head.name = "lm_head";
  head.in_features = d;
  head.out_features = n_vocab;
  head.weight_bits = 8;
  head.activation.bits = 8;
  head.activation.symmetric = false;
  head.activation.dynamic = true;
  std::vector<std::int8_t> codes;
  std::vector<float> scale;
  row_codes(lm_head(), n_vocab, d, codes, scale);
  head.weights = PackedWeights::pack(view(codes.data(), {n_vocab, d}), 8, 0, Backend::automatic, view(scale.data(), {n_vocab}));
  if (!tied_lm_head_) row_codes(embeddings_, n_vocab, d, embedding_codes_, embedding_row_scale_);
  quantized_lm_head_ = std::move(head);
  // the floating-point copies are no longer read
  std::vector<float>().swap(embeddings_);
  std::vector<float>().swap(lm_head_);
}

void Model::embed(const std::int32_t* tokens, std::size_t n, float* out, std::int8_t* code_scratch) const {
  const std::int64_t d = info_.n_embd;
  const auto count = static_cast<std::int64_t>(n);
  if (!quantized_lm_head_) {
    for (std::int64_t i = 0; i < count; ++i)
      std::memcpy(out + i * d, embeddings_.data() + std::int64_t{tokens[i]} * d,
                  static_cast<std::size_t>(d) * sizeof(float));
    return;
  }
  // int8 rows times their scale, as osengine.runtime.embedding.EngineEmbedding computes them
  const std::vector<float>& scales =
      tied_lm_head_ ? quantized_lm_head_->weights.weight_scales() : embedding_row_scale_;
  if (tied_lm_head_)
    quantized_lm_head_->weights.unpack_rows(view(const_cast<std::int32_t*>(tokens), {count}),
                                            view(code_scratch, {count, d}));
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int8_t* codes = tied_lm_head_ ? code_scratch + i * d : embedding_codes_.data() + tokens[i] * d;
    const float scale = scales[static_cast<std::size_t>(tokens[i])];
    for (std::int64_t c = 0; c < d; ++c) out[i * d + c] = static_cast<float>(codes[c]) * scale;
  }
}

std::size_t Model::nbytes() const {
  std::size_t total = (embeddings_.size() + final_norm_.size() + lm_head_.size()) * sizeof(float);
  if (quantized_lm_head_)
    total += quantized_lm_head_->weights.nbytes() + quantized_lm_head_->weights.weight_scales().size() * sizeof(float) +
             embedding_codes_.size() + embedding_row_scale_.size() * sizeof(float);
  for (const auto& block : blocks_) {
    total += (block.attn_norm.size() + block.mlp_norm.size() + block.prefix_keys.size() + block.prefix_values.size()) *
             sizeof(float);
    for (const auto& q : block.fused)
      total += q.weights.nbytes() +
               (q.weights.weight_scales().size() + q.bias.size() + q.input_shift.size()) * sizeof(float);
    for (const Projection* p : {&block.q, &block.k, &block.v, &block.o, &block.gate, &block.up, &block.down})
      total += (p->float_linear.weight.size() + p->float_linear.bias.size()) * sizeof(float);
  }
  return total;
}

std::size_t Model::bytes_per_token() const {
  std::size_t total = nbytes();
  // the embedding table is read one row per token: take it out of the weights' bytes
  const std::size_t table = static_cast<std::size_t>(info_.n_vocab) * static_cast<std::size_t>(info_.n_embd);
  if (!quantized_lm_head_) {
    if (!tied_lm_head_) total -= table * sizeof(float);  // tied: the table is lm_head, read whole
  } else if (!tied_lm_head_) {
    total -= embedding_codes_.size() + embedding_row_scale_.size() * sizeof(float);
  }
  return total;
}

}  // namespace osengine::runtime
