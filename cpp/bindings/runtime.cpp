// osengine._C.Runtime*: the native runtime (osengine::runtime) for Python: load a quantized folder, decode tokens,
// read logits, generate; its tokenizer (RuntimeTokenizer: a tokenizer.json, text <-> ids). Decoding releases the GIL, so contexts on one model can run in parallel threads.
#include "runtime.hpp"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>

#include "osengine/errors.hpp"
#include "osengine/runtime/attention.hpp"
#include "osengine/runtime/context.hpp"
#include "osengine/runtime/errors.hpp"
#include "osengine/runtime/model.hpp"
#include "osengine/runtime/tokenizer.hpp"

namespace py = pybind11;
namespace rt = osengine::runtime;

namespace osengine::python {

namespace {

py::dict model_info(const rt::Model& model) {
  const rt::ModelInfo& i = model.info();
  py::dict d;
  d["architecture"] = i.architecture;
  d["n_layer"] = i.n_layer;
  d["n_embd"] = i.n_embd;
  d["n_head"] = i.n_head;
  d["n_head_kv"] = i.n_head_kv;
  d["head_dim"] = i.head_dim;
  d["n_ff"] = i.n_ff;
  d["n_vocab"] = i.n_vocab;
  d["n_ctx_train"] = i.n_ctx_train;
  d["rms_norm_eps"] = i.rms_norm_eps;
  d["rope_theta"] = i.rope_theta;
  d["tied_embeddings"] = i.tied_embeddings;
  d["bos_token_id"] = i.bos_token_id;
  d["eos_token_id"] = i.eos_token_id;
  d["recipe"] = i.recipe;
  d["prefix"] = i.prefix;
  d["quantize_embeddings"] = model.options().quantize_embeddings;
  return d;
}

std::vector<std::int32_t> token_ids(py::handle tokens) {
  const auto array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(tokens);
  if (!array || array.ndim() != 1)
    throw osengine::ArgumentError("runtime.Context.decode", "tokens", "must be a 1-D sequence of token ids");
  std::vector<std::int32_t> ids(static_cast<std::size_t>(array.size()));
  for (py::ssize_t i = 0; i < array.size(); ++i) {
    const std::int64_t v = array.at(i);
    if (v < INT32_MIN || v > INT32_MAX)
      throw osengine::ArgumentError("runtime.Context.decode", "tokens", "token id " + std::to_string(v) +
                                                                        " does not fit int32");
    ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(v);
  }
  return ids;
}

// Bytes per second `threads` threads read from an nbytes buffer (best of `repeats`): each thread sums its share as
// 64-bit words with four independent sums (vectorized by the compiler), far faster than memory on any x86-64 core.
double read_bandwidth(std::size_t nbytes, int threads, int repeats) {
  const std::size_t words = nbytes / sizeof(std::uint64_t) / 4 * 4;
  std::vector<std::uint64_t> buffer(words, 1);
  double best = 0.0;
  volatile std::uint64_t sink = 0;
  for (int rep = 0; rep < repeats; ++rep) {
    std::uint64_t total = 0;
    const auto start = std::chrono::steady_clock::now();
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
    for (std::int64_t t = 0; t < threads; ++t) {
      const std::size_t begin = words * static_cast<std::size_t>(t) / static_cast<std::size_t>(threads) / 4 * 4;
      const std::size_t end = words * static_cast<std::size_t>(t + 1) / static_cast<std::size_t>(threads) / 4 * 4;
      std::uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (std::size_t i = begin; i < end; i += 4) {
        s0 += buffer[i];
        s1 += buffer[i + 1];
        s2 += buffer[i + 2];
        s3 += buffer[i + 3];
      }
      total += s0 + s1 + s2 + s3;
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    sink = sink + total;
    best = std::max(best, static_cast<double>(words * sizeof(std::uint64_t)) / seconds);
  }
  return best;
}

}  // namespace

void bind_runtime(py::module_& m) {
  py::register_exception<rt::LoadError>(m, "RuntimeLoadError", PyExc_ValueError);

  py::class_<rt::Model, std::shared_ptr<rt::Model>>(m, "RuntimeModel")
      .def_static("load", [](const std::string& directory, bool quantize_embeddings) {
        rt::ModelOptions options;
        options.quantize_embeddings = quantize_embeddings;
        std::shared_ptr<const rt::Model> model;
        {
          py::gil_scoped_release release;
          model = rt::Model::load(directory, options);
        }
        return std::const_pointer_cast<rt::Model>(model);
      }, py::arg("directory"), py::kw_only(), py::arg("quantize_embeddings") = false)
      .def_property_readonly("info", &model_info)
      .def_property_readonly("nbytes", &rt::Model::nbytes)
      .def_property_readonly("bytes_per_token", &rt::Model::bytes_per_token);

  py::class_<rt::Context>(m, "RuntimeContext")
      .def(py::init([](std::shared_ptr<rt::Model> model, int n_ctx, int n_batch, int n_threads, int n_seq) {
             rt::ContextOptions options;
             options.n_ctx = n_ctx;
             options.n_batch = n_batch;
             options.n_threads = n_threads;
             options.n_seq = n_seq;
             return std::make_unique<rt::Context>(std::move(model), options);
           }),
           py::arg("model"), py::arg("n_ctx") = 2048, py::arg("n_batch") = 512, py::arg("n_threads") = 0,
           py::arg("n_seq") = 1)
      .def("decode", [](rt::Context& context, py::handle tokens, bool all_logits, int seq) {
        const std::vector<std::int32_t> ids = token_ids(tokens);
        {
          py::gil_scoped_release release;
          context.decode(ids, all_logits, seq);
        }
        const auto n_vocab = static_cast<py::ssize_t>(context.model().info().n_vocab);
        const auto rows = static_cast<py::ssize_t>(all_logits ? ids.size() : 1);
        py::array_t<float> out({rows, n_vocab});
        for (py::ssize_t r = 0; r < rows; ++r)
          std::memcpy(out.mutable_data(r, 0), context.logits(all_logits ? static_cast<int>(r) : -1),
                      static_cast<std::size_t>(n_vocab) * sizeof(float));
        return out;
      }, py::arg("tokens"), py::arg("all_logits") = false, py::arg("seq") = 0,
         "Decode tokens of sequence `seq` after its cached ones; returns the logits [1, n_vocab] of the last token "
         "(every token's with all_logits)")
      .def("decode_batch", [](rt::Context& context, py::handle tokens, const std::vector<int>& seqs) {
        const std::vector<std::int32_t> ids = token_ids(tokens);
        if (ids.size() != seqs.size())
          throw ArgumentError("RuntimeContext.decode_batch", "seqs",
                              "must name one sequence per token (" + std::to_string(ids.size()) + " tokens, " +
                                  std::to_string(seqs.size()) + " sequences)");
        {
          py::gil_scoped_release release;
          context.decode_batch(ids.data(), seqs.data(), ids.size());
        }
        const auto n_vocab = static_cast<py::ssize_t>(context.model().info().n_vocab);
        const auto rows = static_cast<py::ssize_t>(ids.size());
        py::array_t<float> out({rows, n_vocab});
        for (py::ssize_t r = 0; r < rows; ++r)
          std::memcpy(out.mutable_data(r, 0), context.logits(static_cast<int>(r)),
                      static_cast<std::size_t>(n_vocab) * sizeof(float));
        return out;
      }, py::arg("tokens"), py::arg("seqs"),
         "One token for each of several different sequences in one pass; returns their logits [n, n_vocab]")
      .def_property_readonly("n_past", [](const rt::Context& context) { return context.n_past(0); })
      .def("n_past_of", &rt::Context::n_past, py::arg("seq"))
      .def("kv_clear", &rt::Context::kv_clear, py::arg("seq") = -1)
      .def("kv_truncate", &rt::Context::kv_truncate, py::arg("pos"), py::arg("seq") = 0);

  py::class_<rt::Tokenizer>(m, "RuntimeTokenizer")
      .def_static("from_file", &rt::Tokenizer::from_file, py::arg("path"))
      .def_static("from_json_string", &rt::Tokenizer::from_json_string, py::arg("json"),
                  py::arg("origin") = "tokenizer.json string")
      .def("encode", [](const rt::Tokenizer& t, const std::string& text, bool add_special_tokens) {
        py::gil_scoped_release release;
        return t.encode(text, add_special_tokens);
      }, py::arg("text"), py::arg("add_special_tokens") = true,
         "Token ids of `text` (str, or bytes: invalid UTF-8 becomes U+FFFD); with add_special_tokens the "
         "post-processor's special tokens")
      .def("decode", [](const rt::Tokenizer& t, const std::vector<std::int32_t>& ids, bool skip_special_tokens) {
        std::string text;
        {
          py::gil_scoped_release release;
          text = t.decode(ids, skip_special_tokens);
        }
        return py::str(text);
      }, py::arg("ids"), py::arg("skip_special_tokens") = false)
      .def("token_to_piece", [](const rt::Tokenizer& t, std::int32_t id) { return py::bytes(t.token_to_piece(id)); },
           py::arg("id"), "The bytes of one token (possibly part of a UTF-8 character), for streaming")
      .def("token_id", &rt::Tokenizer::token_id, py::arg("token"))
      .def("id_to_token", &rt::Tokenizer::id_to_token, py::arg("id"))
      .def("is_special", &rt::Tokenizer::is_special, py::arg("id"))
      .def_property_readonly("vocab_size", &rt::Tokenizer::vocab_size)
      .def_property_readonly("bos_token_id", &rt::Tokenizer::bos_token_id);

  // The runtime's RoPE and attention, for the Python models that compute them as the runtime does
  // (osengine.runtime.attention).
  m.def("runtime_rope_tables", [](float theta, std::int64_t head_dim, py::handle positions) {
    const char* op = "runtime_rope_tables";
    if (!(theta > 0.0f) || !std::isfinite(theta)) throw osengine::ArgumentError(op, "theta", "must be positive and finite");
    if (head_dim <= 0 || head_dim % 2 != 0)
      throw osengine::ArgumentError(op, "head_dim", "must be positive and even, got " + std::to_string(head_dim));
    const auto pos = py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>::ensure(positions);
    if (!pos || pos.ndim() != 1) throw osengine::ArgumentError(op, "positions", "must be a 1-D array of integers");
    const std::int64_t n = pos.shape(0), half = head_dim / 2;
    std::vector<float> inv_freq(static_cast<std::size_t>(half));
    rt::rope_inv_freq(theta, head_dim, inv_freq.data());
    py::array_t<float> cos({n, half}), sin({n, half});
    rt::rope_tables(inv_freq.data(), half, pos.data(), n, cos.mutable_data(), sin.mutable_data());
    return py::make_tuple(cos, sin);
  }, py::arg("theta"), py::arg("head_dim"), py::arg("positions"),
     "cos, sin [n, head_dim / 2] of the native runtime's RoPE at these positions.");
  m.def("runtime_causal_attention", [](py::handle q_in, py::handle k_in, py::handle v_in) {
    const char* op = "runtime_causal_attention";
    using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
    const F32 q = F32::ensure(q_in), k = F32::ensure(k_in), v = F32::ensure(v_in);
    if (!q || !k || !v || q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3)
      throw osengine::ArgumentError(op, "q, k, v", "must be float arrays [tokens, heads, head_dim]");
    const std::int64_t t = q.shape(0), n_head = q.shape(1), hd = q.shape(2), s = k.shape(0), n_kv = k.shape(1);
    if (k.shape(2) != hd || v.shape(0) != s || v.shape(1) != n_kv || v.shape(2) != hd)
      throw osengine::ArgumentError(op, "k, v", "must both be [keys, kv_heads, head_dim] with q's head_dim");
    if (n_kv <= 0 || n_head % n_kv != 0)
      throw osengine::ArgumentError(op, "k", "kv_heads must divide q's heads (" + std::to_string(n_head) + ")");
    if (s < t) throw osengine::ArgumentError(op, "k", "needs at least as many keys as queries (causal, queries last)");
    py::array_t<float> out({t, n_head, hd});
    {
      py::gil_scoped_release release;
      rt::causal_attention(q.data(), k.data(), v.data(), t, s, n_head, n_kv, hd, out.mutable_data());
    }
    return out;
  }, py::arg("q"), py::arg("k"), py::arg("v"),
     "Causal attention as the native runtime computes it: q [t, heads, d], k and v [s, kv_heads, d] (query i at "
     "position s - t + i) -> [t, heads, d].");
  m.def("read_bandwidth", [](std::size_t nbytes, int threads, int repeats) {
    if (nbytes < (1u << 20)) throw ArgumentError("read_bandwidth", "nbytes", "must be at least 1 MiB");
    if (threads < 1 || repeats < 1) throw ArgumentError("read_bandwidth", "threads", "threads and repeats must be >= 1");
    py::gil_scoped_release release;
    return read_bandwidth(nbytes, threads, repeats);
  }, py::arg("nbytes") = std::size_t{512} << 20, py::arg("threads") = 1, py::arg("repeats") = 5,
     "Best-of-repeats bytes per second that `threads` threads read from a buffer of nbytes (larger than the caches):"
     " the memory bandwidth that bounds decoding");

  m.def("runtime_generate", [](rt::Context& context, py::handle prompt, int max_new_tokens, float temperature, int top_k,
                         float top_p, std::uint64_t seed, py::object on_token) {
    const std::vector<std::int32_t> ids = token_ids(prompt);
    rt::Sampler::Options options;
    options.temperature = temperature;
    options.top_k = top_k;
    options.top_p = top_p;
    options.seed = seed;
    rt::Sampler sampler(options);
    std::function<bool(std::int32_t)> callback;
    if (!on_token.is_none())
      callback = [&on_token](std::int32_t token) {  // runs with the GIL released: take it for the Python call
        py::gil_scoped_acquire acquire;
        const py::object go_on = on_token(token);
        return go_on.is_none() || go_on.cast<bool>();  // only False (or a falsy value) stops
      };
    py::gil_scoped_release release;
    return rt::generate(context, ids, max_new_tokens, sampler, callback);
  }, py::arg("context"), py::arg("prompt"), py::arg("max_new_tokens"), py::arg("temperature") = 0.0f,
     py::arg("top_k") = 0, py::arg("top_p") = 1.0f, py::arg("seed") = 0, py::arg("on_token") = py::none(),
     "Decode the prompt, then up to max_new_tokens tokens (greedy at temperature 0); stops at the end-of-sequence "
     "token. on_token(id), if given, is called with each new token as it is chosen (return False to stop). Returns "
     "the new tokens.");
}

}  // namespace osengine::python
