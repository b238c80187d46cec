// The C API (osengine/runtime/c_api.h) over the C++ runtime: each call runs its body inside guard(), which turns
// every exception into a status code and the calling thread's last-error message, so nothing crosses the C boundary.
#include "osengine/runtime/c_api.h"

#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "osengine/errors.hpp"
#include "osengine/runtime/context.hpp"
#include "osengine/runtime/errors.hpp"
#include "osengine/runtime/model.hpp"
#include "osengine/runtime/tokenizer.hpp"

struct osengine_model {
  std::shared_ptr<const osengine::runtime::Model> model;
};
struct osengine_context {
  osengine::runtime::Context context;  // holds its own reference to the model
};
struct osengine_sampler {
  osengine::runtime::Sampler sampler;
};
struct osengine_tokenizer {
  osengine::runtime::Tokenizer tokenizer;
};

namespace {

thread_local std::string t_last_error;
// Set when the message itself could not be stored (out of memory): then this static text is the message.
thread_local const char* t_fallback_error = nullptr;

void clear_error() noexcept {
  t_last_error.clear();
  t_fallback_error = nullptr;
}

osengine_status fail(const char* function, osengine_status status, std::string_view message) noexcept {
  try {
    t_last_error.assign(function).append(": ").append(message);
    t_fallback_error = nullptr;
  } catch (...) {
    t_last_error.clear();
    t_fallback_error = "osengine: out of memory (the error message could not be stored)";
  }
  return status;
}

// A bad argument found by this file (the C++ API's own checks throw osengine::ArgumentError).
struct CArgumentError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A caller's buffer too small for the output (the required size has been written).
struct BufferTooSmall : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class T>
void require_non_null(const T* pointer, const char* argument) {
  if (pointer == nullptr) throw CArgumentError(std::string("argument '") + argument + "' is NULL");
}

// Maps the exception being handled to a status (call only inside a catch block).
osengine_status translate_current_exception(const char* function) noexcept {
  try {
    throw;
  } catch (const osengine::runtime::LoadError& e) {
    return fail(function, OSENGINE_LOAD_ERROR, e.what());
  } catch (const BufferTooSmall& e) {
    return fail(function, OSENGINE_BUFFER_TOO_SMALL, e.what());
  } catch (const std::invalid_argument& e) {  // osengine::ArgumentError, DTypeError, CArgumentError
    return fail(function, OSENGINE_INVALID_ARGUMENT, e.what());
  } catch (const osengine::UnsupportedError& e) {
    return fail(function, OSENGINE_UNSUPPORTED, e.what());
  } catch (const std::bad_alloc&) {
    return fail(function, OSENGINE_OUT_OF_MEMORY, "out of memory");
  } catch (const std::length_error& e) {
    return fail(function, OSENGINE_OUT_OF_MEMORY, std::string("a buffer would exceed the maximum size: ") + e.what());
  } catch (const std::exception& e) {
    return fail(function, OSENGINE_INTERNAL_ERROR, e.what());
  } catch (...) {
    return fail(function, OSENGINE_INTERNAL_ERROR, "an unknown exception");
  }
}

// Runs `body`; exceptions become statuses. Success clears the thread's last error.
template <class Body>
osengine_status guard(const char* function, Body&& body) noexcept {
  try {
    body();
    clear_error();
    return OSENGINE_OK;
  } catch (...) {
    return translate_current_exception(function);
  }
}

// The two-call pattern. Before the work: a NULL buffer is the size query (capacity 0).
void check_buffer(const void* buffer, const char* buffer_name, size_t capacity) {
  if (buffer == nullptr && capacity != 0)
    throw CArgumentError(std::string("argument '") + buffer_name + "' is NULL but capacity is " +
                         std::to_string(capacity) + " (pass capacity 0 to ask for the size)");
}
// After the caller's *out_n was set: returns when `required` elements fit (or for the size query), else throws
// BufferTooSmall.
void check_capacity(const void* buffer, const char* buffer_name, size_t capacity, size_t required, const char* unit) {
  if (buffer != nullptr && capacity < required)
    throw BufferTooSmall(std::string("argument '") + buffer_name + "': capacity " + std::to_string(capacity) +
                         " is too small, " + std::to_string(required) + " " + unit + " are needed");
}

// Text out: NUL-terminated, *out_len without the NUL.
void write_text(const std::string& text, char* buffer, const char* buffer_name, size_t capacity, size_t* out_len) {
  *out_len = text.size();
  check_capacity(buffer, buffer_name, capacity, text.size() + 1, "bytes (the text and its NUL)");
  if (buffer == nullptr) return;
  if (!text.empty()) std::memcpy(buffer, text.data(), text.size());
  buffer[text.size()] = '\0';
}

template <class T, class Get>
osengine_status model_info(const char* function, const osengine_model* model, T* out, const char* out_name, Get get) {
  return guard(function, [&] {
    require_non_null(model, "model");
    require_non_null(out, out_name);
    *out = get(model->model->info());
  });
}

}  // namespace

extern "C" {

const char* osengine_last_error(void) noexcept {
  return t_fallback_error != nullptr ? t_fallback_error : t_last_error.c_str();
}

const char* osengine_status_name(osengine_status status) noexcept {
  switch (status) {
    case OSENGINE_OK: return "OSENGINE_OK";
    case OSENGINE_INVALID_ARGUMENT: return "OSENGINE_INVALID_ARGUMENT";
    case OSENGINE_LOAD_ERROR: return "OSENGINE_LOAD_ERROR";
    case OSENGINE_OUT_OF_MEMORY: return "OSENGINE_OUT_OF_MEMORY";
    case OSENGINE_BUFFER_TOO_SMALL: return "OSENGINE_BUFFER_TOO_SMALL";
    case OSENGINE_UNSUPPORTED: return "OSENGINE_UNSUPPORTED";
    case OSENGINE_INTERNAL_ERROR: return "OSENGINE_INTERNAL_ERROR";
  }
  return "(not an osengine_status)";
}

// ---- model ----------------------------------------------------------------------------------------------------------

osengine_status osengine_model_load(const char* dir, osengine_model** out_model) noexcept {
  return guard(__func__, [&] {
    require_non_null(dir, "dir");
    require_non_null(out_model, "out_model");
    auto handle = std::make_unique<osengine_model>();
    handle->model = osengine::runtime::Model::load(dir);
    *out_model = handle.release();
  });
}

osengine_status osengine_model_load_with_flags(const char* dir, uint32_t flags, osengine_model** out_model) noexcept {
  return guard(__func__, [&] {
    require_non_null(dir, "dir");
    require_non_null(out_model, "out_model");
    if ((flags & ~OSENGINE_MODEL_QUANTIZE_EMBEDDINGS) != 0)
      throw CArgumentError("argument 'flags' has unknown bits (" + std::to_string(flags) +
                           "); known: OSENGINE_MODEL_QUANTIZE_EMBEDDINGS");
    osengine::runtime::ModelOptions options;
    options.quantize_embeddings = (flags & OSENGINE_MODEL_QUANTIZE_EMBEDDINGS) != 0;
    auto handle = std::make_unique<osengine_model>();
    handle->model = osengine::runtime::Model::load(dir, options);
    *out_model = handle.release();
  });
}

void osengine_model_free(osengine_model* model) noexcept { delete model; }


osengine_status osengine_model_n_vocab(const osengine_model* model, int32_t* out_n_vocab) noexcept {
  return model_info(__func__, model, out_n_vocab, "out_n_vocab", [](const auto& info) { return info.n_vocab; });
}

osengine_status osengine_model_n_ctx_train(const osengine_model* model, int32_t* out_n_ctx_train) noexcept {
  return model_info(__func__, model, out_n_ctx_train, "out_n_ctx_train",
                    [](const auto& info) { return info.n_ctx_train; });
}

osengine_status osengine_model_bos_token(const osengine_model* model, int32_t* out_token) noexcept {
  return model_info(__func__, model, out_token, "out_token", [](const auto& info) { return info.bos_token_id; });
}

osengine_status osengine_model_eos_token(const osengine_model* model, int32_t* out_token) noexcept {
  return model_info(__func__, model, out_token, "out_token", [](const auto& info) { return info.eos_token_id; });
}

osengine_status osengine_model_architecture(const osengine_model* model, const char** out_name) noexcept {
  return model_info(__func__, model, out_name, "out_name",
                    [](const auto& info) { return info.architecture.c_str(); });
}

// ---- context --------------------------------------------------------------------------------------------------------

// The body of osengine_context_create(_multi), run inside their guard.
static void create_context(const osengine_model* model, int32_t n_ctx, int32_t n_batch, int32_t n_threads,
                           int32_t n_seq, osengine_context** out_context) {
  require_non_null(model, "model");
  require_non_null(out_context, "out_context");
  osengine::runtime::ContextOptions options;
  options.n_ctx = n_ctx;
  options.n_batch = n_batch;
  options.n_threads = n_threads;
  options.n_seq = n_seq;
  *out_context = new osengine_context{osengine::runtime::Context(model->model, options)};
}

osengine_status osengine_context_create(const osengine_model* model, int32_t n_ctx, int32_t n_batch,
                                        int32_t n_threads, osengine_context** out_context) noexcept {
  return guard(__func__, [&] { create_context(model, n_ctx, n_batch, n_threads, 1, out_context); });
}

void osengine_context_free(osengine_context* context) noexcept { delete context; }

osengine_status osengine_context_decode(osengine_context* context, const int32_t* tokens, size_t n,
                                        int all_logits) noexcept {
  return guard(__func__, [&] {
    require_non_null(context, "context");
    require_non_null(tokens, "tokens");
    if (n == 0) throw CArgumentError("argument 'n' is 0: decode needs at least one token");
    context->context.decode(tokens, n, all_logits != 0);
  });
}

osengine_status osengine_context_logits(const osengine_context* context, int32_t i, const float** out_logits) noexcept {
  return guard(__func__, [&] {
    require_non_null(context, "context");
    require_non_null(out_logits, "out_logits");
    *out_logits = context->context.logits(i);
  });
}

osengine_status osengine_context_n_past(const osengine_context* context, int32_t* out_n_past) noexcept {
  return guard(__func__, [&] {
    require_non_null(context, "context");
    require_non_null(out_n_past, "out_n_past");
    *out_n_past = context->context.n_past();
  });
}

osengine_status osengine_context_kv_clear(osengine_context* context) noexcept {
  return guard(__func__, [&] {
    require_non_null(context, "context");
    context->context.kv_clear();
  });
}

osengine_status osengine_context_kv_truncate(osengine_context* context, int32_t pos) noexcept {
  return guard(__func__, [&] {
    require_non_null(context, "context");
    context->context.kv_truncate(pos);
  });
}

osengine_status osengine_context_create_multi(const osengine_model* model, int32_t n_ctx, int32_t n_batch,
                                              int32_t n_threads, int32_t n_seq,
                                              osengine_context** out_context) noexcept {
  return guard(__func__, [&] { create_context(model, n_ctx, n_batch, n_threads, n_seq, out_context); });
}

osengine_status osengine_context_decode_seq(osengine_context* context, int32_t seq, const int32_t* tokens, size_t n,
                                            int all_logits) noexcept {
  return guard(__func__, [&] {
    require_non_null(context, "context");
    require_non_null(tokens, "tokens");
    if (n == 0) throw CArgumentError("argument 'n' is 0: decode needs at least one token");
    context->context.decode(tokens, n, all_logits != 0, seq);
  });
}

osengine_status osengine_context_decode_batch(osengine_context* context, const int32_t* tokens, const int32_t* seqs,
                                              size_t n) noexcept {
  return guard(__func__, [&] {
    require_non_null(context, "context");
    require_non_null(tokens, "tokens");
    require_non_null(seqs, "seqs");
    if (n == 0) throw CArgumentError("argument 'n' is 0: decode_batch needs at least one token");
    static_assert(sizeof(int32_t) == sizeof(int), "sequence ids are passed as int");
    context->context.decode_batch(tokens, reinterpret_cast<const int*>(seqs), n);
  });
}

osengine_status osengine_context_n_past_seq(const osengine_context* context, int32_t seq, int32_t* out_n_past) noexcept {
  return guard(__func__, [&] {
    require_non_null(context, "context");
    require_non_null(out_n_past, "out_n_past");
    *out_n_past = context->context.n_past(seq);
  });
}

osengine_status osengine_context_kv_clear_seq(osengine_context* context, int32_t seq) noexcept {
  return guard(__func__, [&] {
    require_non_null(context, "context");
    context->context.kv_clear(seq);
  });
}

osengine_status osengine_context_kv_truncate_seq(osengine_context* context, int32_t seq, int32_t pos) noexcept {
  return guard(__func__, [&] {
    require_non_null(context, "context");
    context->context.kv_truncate(pos, seq);
  });
}

// ---- sampler --------------------------------------------------------------------------------------------------------

osengine_status osengine_sampler_create(float temperature, int32_t top_k, float top_p, uint64_t seed,
                                        osengine_sampler** out_sampler) noexcept {
  return guard(__func__, [&] {
    require_non_null(out_sampler, "out_sampler");
    osengine::runtime::Sampler::Options options;
    options.temperature = temperature;
    options.top_k = top_k;
    options.top_p = top_p;
    options.seed = seed;
    *out_sampler = new osengine_sampler{osengine::runtime::Sampler(options)};
  });
}

void osengine_sampler_free(osengine_sampler* sampler) noexcept { delete sampler; }

osengine_status osengine_sampler_sample(osengine_sampler* sampler, const float* logits, int32_t n_vocab,
                                        int32_t* out_token) noexcept {
  return guard(__func__, [&] {
    require_non_null(sampler, "sampler");
    require_non_null(logits, "logits");
    require_non_null(out_token, "out_token");
    if (n_vocab <= 0) throw CArgumentError("argument 'n_vocab' must be positive, got " + std::to_string(n_vocab));
    *out_token = sampler->sampler.sample(logits, n_vocab);
  });
}

// ---- generation -----------------------------------------------------------------------------------------------------

osengine_status osengine_generate(osengine_context* context, const int32_t* prompt, size_t n_prompt,
                                  int32_t max_new_tokens, osengine_sampler* sampler, osengine_token_callback on_token,
                                  void* user_data, int32_t* out_n_generated) noexcept {
  return guard(__func__, [&] {
    require_non_null(context, "context");
    require_non_null(prompt, "prompt");
    require_non_null(sampler, "sampler");
    if (n_prompt == 0) throw CArgumentError("argument 'n_prompt' is 0: generation needs at least one prompt token");
    if (max_new_tokens < 0)
      throw CArgumentError("argument 'max_new_tokens' must be >= 0, got " + std::to_string(max_new_tokens));
    const std::vector<std::int32_t> tokens(prompt, prompt + n_prompt);
    std::function<bool(std::int32_t)> callback;
    if (on_token != nullptr) callback = [&](std::int32_t token) { return on_token(token, user_data) == 0; };
    const auto generated =
        osengine::runtime::generate(context->context, tokens, max_new_tokens, sampler->sampler, callback);
    if (out_n_generated != nullptr) *out_n_generated = static_cast<int32_t>(generated.size());
  });
}

// ---- tokenizer ------------------------------------------------------------------------------------------------------

osengine_status osengine_tokenizer_load(const char* path, osengine_tokenizer** out_tokenizer) noexcept {
  return guard(__func__, [&] {
    require_non_null(path, "path");
    require_non_null(out_tokenizer, "out_tokenizer");
    std::string file = path;
    std::error_code ec;
    if (std::filesystem::is_directory(file, ec)) file = (std::filesystem::path(file) / "tokenizer.json").string();
    *out_tokenizer = new osengine_tokenizer{osengine::runtime::Tokenizer::from_file(file)};
  });
}

void osengine_tokenizer_free(osengine_tokenizer* tokenizer) noexcept { delete tokenizer; }

osengine_status osengine_tokenizer_encode(const osengine_tokenizer* tokenizer, const char* text, size_t text_len,
                                          int add_special, int32_t* ids, size_t capacity, size_t* out_n_ids) noexcept {
  return guard(__func__, [&] {
    require_non_null(tokenizer, "tokenizer");
    if (text_len != 0) require_non_null(text, "text");
    check_buffer(ids, "ids", capacity);
    require_non_null(out_n_ids, "out_n_ids");
    const auto encoded =
        tokenizer->tokenizer.encode(std::string_view(text_len != 0 ? text : "", text_len), add_special != 0);
    *out_n_ids = encoded.size();
    check_capacity(ids, "ids", capacity, encoded.size(), "ids");
    if (ids != nullptr && !encoded.empty()) std::memcpy(ids, encoded.data(), encoded.size() * sizeof(std::int32_t));
  });
}

osengine_status osengine_tokenizer_decode(const osengine_tokenizer* tokenizer, const int32_t* ids, size_t n_ids,
                                          int skip_special, char* text, size_t capacity, size_t* out_len) noexcept {
  return guard(__func__, [&] {
    require_non_null(tokenizer, "tokenizer");
    if (n_ids != 0) require_non_null(ids, "ids");
    check_buffer(text, "text", capacity);
    require_non_null(out_len, "out_len");
    const std::vector<std::int32_t> id_vector(ids, ids + n_ids);
    write_text(tokenizer->tokenizer.decode(id_vector, skip_special != 0), text, "text", capacity, out_len);
  });
}

osengine_status osengine_tokenizer_token_to_piece(const osengine_tokenizer* tokenizer, int32_t id, char* piece,
                                                  size_t capacity, size_t* out_len) noexcept {
  return guard(__func__, [&] {
    require_non_null(tokenizer, "tokenizer");
    check_buffer(piece, "piece", capacity);
    require_non_null(out_len, "out_len");
    write_text(tokenizer->tokenizer.token_to_piece(id), piece, "piece", capacity, out_len);
  });
}

osengine_status osengine_tokenizer_vocab_size(const osengine_tokenizer* tokenizer, int32_t* out_vocab_size) noexcept {
  return guard(__func__, [&] {
    require_non_null(tokenizer, "tokenizer");
    require_non_null(out_vocab_size, "out_vocab_size");
    *out_vocab_size = tokenizer->tokenizer.vocab_size();
  });
}

osengine_status osengine_utf8_complete_prefix(const char* bytes, size_t n, size_t* out_prefix) noexcept {
  return guard(__func__, [&] {
    if (n != 0) require_non_null(bytes, "bytes");
    require_non_null(out_prefix, "out_prefix");
    *out_prefix = osengine::runtime::Tokenizer::utf8_complete_prefix(std::string_view(n != 0 ? bytes : "", n));
  });
}

}  // extern "C"
