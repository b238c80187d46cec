/* The native runtime's C API: osengine::runtime for C and for other languages' foreign-function interfaces
 * (ctypes, cffi, Rust, Go, ...), which cannot catch C++ exceptions or hold C++ objects.
 *
 * Plain C (C89 with <stdint.h>, C99, C++). Objects are opaque handles made by a *_load / *_create call and released
 * by the matching *_free (which accepts NULL). Every other call returns an osengine_status; nothing throws across
 * this boundary and nothing aborts. After a call that fails, osengine_last_error() gives the calling thread's message
 * (the argument and what was expected, or the file and the problem); a call that succeeds clears it.
 *
 * Outputs go through pointer arguments and are written only on success. Variable-size outputs (token ids, text) use
 * the usual two-call pattern: call with a NULL buffer and capacity 0 to learn the size (*n is set, OSENGINE_OK), then
 * again with a buffer that large; a buffer that is too small gives OSENGINE_BUFFER_TOO_SMALL, the required size in
 * *n and nothing written.
 *
 * Threads: a model and a tokenizer may be used from several threads at once; a context or a sampler by one thread at
 * a time. A context keeps its model alive: the model handle may be freed while contexts made from it are in use.
 *
 *   osengine_model* model; osengine_context* ctx; osengine_sampler* sampler; osengine_tokenizer* tok;
 *   if (osengine_model_load("smollm2-w8a8", &model) != OSENGINE_OK) fprintf(stderr, "%s\n", osengine_last_error());
 *   osengine_context_create(model, 2048, 512, 0, &ctx);
 *   osengine_sampler_create(0.0f, 0, 1.0f, 0, &sampler);              (greedy)
 *   osengine_tokenizer_load("smollm2-w8a8", &tok);                     (the folder's tokenizer.json)
 *   ... osengine_tokenizer_encode, osengine_generate with a callback, osengine_tokenizer_token_to_piece ...
 *
 * cpp/examples/03_c_generate/main.c is a complete program; docs/runtime.md, "C API", describes it. */
#ifndef OSENGINE_RUNTIME_C_API_H
#define OSENGINE_RUNTIME_C_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#define OSENGINE_C_NOEXCEPT noexcept
extern "C" {
#else
#define OSENGINE_C_NOEXCEPT
#endif

typedef enum osengine_status {
  OSENGINE_OK = 0,
  OSENGINE_INVALID_ARGUMENT = 1, /* a NULL pointer, a bad size or value, an id outside the vocabulary, a full context */
  OSENGINE_LOAD_ERROR = 2,       /* a model folder or tokenizer.json that cannot be loaded (missing, corrupt, ...) */
  OSENGINE_OUT_OF_MEMORY = 3,
  OSENGINE_BUFFER_TOO_SMALL = 4, /* the caller's buffer: the required size was written, nothing else */
  OSENGINE_UNSUPPORTED = 5,      /* a valid request this build or this machine cannot serve */
  OSENGINE_INTERNAL_ERROR = 6    /* anything else (a bug: please report the message) */
} osengine_status;

typedef struct osengine_model osengine_model;
typedef struct osengine_context osengine_context;
typedef struct osengine_sampler osengine_sampler;
typedef struct osengine_tokenizer osengine_tokenizer;

/* The message of the calling thread's last failed call ("" after a call that succeeded). Valid until the thread's
 * next osengine call; never NULL. */
const char* osengine_last_error(void) OSENGINE_C_NOEXCEPT;
/* The status code's name, e.g. "OSENGINE_LOAD_ERROR" (a static string; never NULL), for log lines. */
const char* osengine_status_name(osengine_status status) OSENGINE_C_NOEXCEPT;

/* ---- model ------------------------------------------------------------------------------------------------------ */

/* Loads the quantized folder `dir` (osengine.json, config.json, model.safetensors, as `osengine quantize --out`
 * writes it): weights are validated and packed once. OSENGINE_LOAD_ERROR names the folder and the problem. */
osengine_status osengine_model_load(const char* dir, osengine_model** out_model) OSENGINE_C_NOEXCEPT;
/* Load choices for osengine_model_load_with_flags (bits; 0: the folder's recipe as saved). */
#define OSENGINE_MODEL_QUANTIZE_EMBEDDINGS 1u /* lm_head on the engine (int8) and the embedding table in int8:
                                                 faster decoding for a small accuracy cost (docs/runtime.md) */
osengine_status osengine_model_load_with_flags(const char* dir, uint32_t flags,
                                               osengine_model** out_model) OSENGINE_C_NOEXCEPT;
void osengine_model_free(osengine_model* model) OSENGINE_C_NOEXCEPT;

/* From the folder's config.json. bos / eos are -1 when the config gives none; generation stops after the eos. */
osengine_status osengine_model_n_vocab(const osengine_model* model, int32_t* out_n_vocab) OSENGINE_C_NOEXCEPT;
osengine_status osengine_model_n_ctx_train(const osengine_model* model, int32_t* out_n_ctx_train) OSENGINE_C_NOEXCEPT;
osengine_status osengine_model_bos_token(const osengine_model* model, int32_t* out_token) OSENGINE_C_NOEXCEPT;
osengine_status osengine_model_eos_token(const osengine_model* model, int32_t* out_token) OSENGINE_C_NOEXCEPT;
/* "llama", "mistral" or "qwen2": a NUL-terminated string owned by the model (valid until osengine_model_free). */
osengine_status osengine_model_architecture(const osengine_model* model, const char** out_name) OSENGINE_C_NOEXCEPT;

/* ---- context: the KV cache and scratch buffers of one sequence ------------------------------------------------- */

/* n_ctx: positions the KV cache holds (> 0); n_batch: tokens per forward pass, longer inputs are split (> 0);
 * n_threads: threads of the CPU kernels (0: all cores). Everything is allocated here: decoding allocates nothing. */
osengine_status osengine_context_create(const osengine_model* model, int32_t n_ctx, int32_t n_batch, int32_t n_threads,
                                        osengine_context** out_context) OSENGINE_C_NOEXCEPT;
void osengine_context_free(osengine_context* context) OSENGINE_C_NOEXCEPT;

/* Runs tokens[0 .. n) after the n_past cached positions and appends them to the cache. Afterwards the logits of the
 * last token are available (of every token when all_logits is nonzero). An id outside the vocabulary or a context
 * too full for n more tokens is OSENGINE_INVALID_ARGUMENT, and nothing is changed. */
osengine_status osengine_context_decode(osengine_context* context, const int32_t* tokens, size_t n,
                                        int all_logits) OSENGINE_C_NOEXCEPT;
/* The n_vocab logits of token i of the last decode (-1: its last token; others need all_logits). The pointer is
 * owned by the context and valid until its next decode, kv_clear, kv_truncate or free. */
osengine_status osengine_context_logits(const osengine_context* context, int32_t i,
                                        const float** out_logits) OSENGINE_C_NOEXCEPT;
/* Positions in the KV cache: where the next decode starts. */
osengine_status osengine_context_n_past(const osengine_context* context, int32_t* out_n_past) OSENGINE_C_NOEXCEPT;
/* Forgets the whole cache (a new sequence) / every position from pos on (pos in [0, n_past]: e.g. to replay from a
 * shared prefix). */
osengine_status osengine_context_kv_clear(osengine_context* context) OSENGINE_C_NOEXCEPT;
osengine_status osengine_context_kv_truncate(osengine_context* context, int32_t pos) OSENGINE_C_NOEXCEPT;

/* ---- several sequences in one context (batched decoding) ------------------------------------------------------- */

/* As osengine_context_create, with a KV cache for n_seq sequences (> 0) of n_ctx positions each; the functions
 * above act on sequence 0. */
osengine_status osengine_context_create_multi(const osengine_model* model, int32_t n_ctx, int32_t n_batch,
                                              int32_t n_threads, int32_t n_seq,
                                              osengine_context** out_context) OSENGINE_C_NOEXCEPT;
/* osengine_context_decode for sequence seq (in [0, n_seq)). */
osengine_status osengine_context_decode_seq(osengine_context* context, int32_t seq, const int32_t* tokens, size_t n,
                                            int all_logits) OSENGINE_C_NOEXCEPT;
/* One new token for each of n different sequences in one forward pass (the weights are read once for all):
 * tokens[i] goes after sequence seqs[i]'s cached positions; its logits are then osengine_context_logits(i). */
osengine_status osengine_context_decode_batch(osengine_context* context, const int32_t* tokens, const int32_t* seqs,
                                              size_t n) OSENGINE_C_NOEXCEPT;
osengine_status osengine_context_n_past_seq(const osengine_context* context, int32_t seq,
                                            int32_t* out_n_past) OSENGINE_C_NOEXCEPT;
/* seq -1 clears every sequence. */
osengine_status osengine_context_kv_clear_seq(osengine_context* context, int32_t seq) OSENGINE_C_NOEXCEPT;
osengine_status osengine_context_kv_truncate_seq(osengine_context* context, int32_t seq,
                                                 int32_t pos) OSENGINE_C_NOEXCEPT;

/* ---- sampler ---------------------------------------------------------------------------------------------------- */

/* temperature 0: greedy (then top_k / top_p do not matter); else softmax(logits / temperature) cut to the top_k
 * tokens (0: all) and to the smallest set with probability >= top_p (in (0, 1]; 1: no cut), drawn from a generator
 * seeded with `seed` (the same seed gives the same tokens). */
osengine_status osengine_sampler_create(float temperature, int32_t top_k, float top_p, uint64_t seed,
                                        osengine_sampler** out_sampler) OSENGINE_C_NOEXCEPT;
void osengine_sampler_free(osengine_sampler* sampler) OSENGINE_C_NOEXCEPT;
/* One token from n_vocab logits (e.g. osengine_context_logits with the model's n_vocab). */
osengine_status osengine_sampler_sample(osengine_sampler* sampler, const float* logits, int32_t n_vocab,
                                        int32_t* out_token) OSENGINE_C_NOEXCEPT;

/* ---- generation ------------------------------------------------------------------------------------------------- */

/* Called with each new token as soon as it is chosen; return nonzero to stop after it. */
typedef int (*osengine_token_callback)(int32_t token, void* user_data);

/* Decodes prompt[0 .. n_prompt) after the cached tokens, then chooses up to max_new_tokens tokens with `sampler`,
 * passing each to on_token (may be NULL). Stops after the model's eos token (which is passed on too), when on_token
 * returns nonzero, or at max_new_tokens. *out_n_generated (may be NULL) is the number of tokens passed on. The
 * context must hold n_prompt + max_new_tokens - 1 more positions. */
osengine_status osengine_generate(osengine_context* context, const int32_t* prompt, size_t n_prompt,
                                  int32_t max_new_tokens, osengine_sampler* sampler, osengine_token_callback on_token,
                                  void* user_data, int32_t* out_n_generated) OSENGINE_C_NOEXCEPT;

/* ---- tokenizer: a Hugging Face tokenizer.json read in C++ ------------------------------------------------------- */

/* `path`: a tokenizer.json, or a folder holding one (a model folder). OSENGINE_LOAD_ERROR names the file and what is
 * wrong or unsupported (docs/runtime.md, "Tokenizer", lists what is supported). */
osengine_status osengine_tokenizer_load(const char* path, osengine_tokenizer** out_tokenizer) OSENGINE_C_NOEXCEPT;
void osengine_tokenizer_free(osengine_tokenizer* tokenizer) OSENGINE_C_NOEXCEPT;

/* Token ids of text[0 .. text_len) (UTF-8; invalid bytes read as U+FFFD), with the tokenizer's special tokens (e.g.
 * a BOS) when add_special is nonzero. Two-call pattern: *out_n_ids is the number of ids; ids may be NULL when
 * capacity is 0. */
osengine_status osengine_tokenizer_encode(const osengine_tokenizer* tokenizer, const char* text, size_t text_len,
                                          int add_special, int32_t* ids, size_t capacity,
                                          size_t* out_n_ids) OSENGINE_C_NOEXCEPT;
/* The text of ids[0 .. n_ids) (special tokens left out when skip_special is nonzero). Text outputs are
 * NUL-terminated: *out_len is the length without the NUL and the buffer needs *out_len + 1 bytes (two-call
 * pattern). Invalid UTF-8 in the tokens' bytes becomes U+FFFD. */
osengine_status osengine_tokenizer_decode(const osengine_tokenizer* tokenizer, const int32_t* ids, size_t n_ids,
                                          int skip_special, char* text, size_t capacity,
                                          size_t* out_len) OSENGINE_C_NOEXCEPT;
/* The bytes one token adds to a text, for streaming: possibly part of a UTF-8 character, and possibly a NUL byte
 * (use *out_len). Buffer as osengine_tokenizer_decode; a piece is rarely longer than 64 bytes. */
osengine_status osengine_tokenizer_token_to_piece(const osengine_tokenizer* tokenizer, int32_t id, char* piece,
                                                  size_t capacity, size_t* out_len) OSENGINE_C_NOEXCEPT;
/* One more than the largest token id. */
osengine_status osengine_tokenizer_vocab_size(const osengine_tokenizer* tokenizer,
                                              int32_t* out_vocab_size) OSENGINE_C_NOEXCEPT;

/* For streaming pieces: the length of the longest prefix of bytes[0 .. n) that does not end inside a UTF-8
 * character that later bytes could complete. Write that prefix, keep the rest for the next piece, and at the end
 * write U+FFFD for what is left (an incomplete character), so that output is never cut inside a character. */
osengine_status osengine_utf8_complete_prefix(const char* bytes, size_t n, size_t* out_prefix) OSENGINE_C_NOEXCEPT;

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* OSENGINE_RUNTIME_C_API_H */
