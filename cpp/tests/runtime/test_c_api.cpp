// The C API (osengine/runtime/c_api.h) without a model folder: status codes and the thread's last-error message for
// a missing folder, NULL pointers and bad values; the two-call buffers of the tokenizer on a small hand-written
// tokenizer.json; the header compiled as C89 (test_c_api_c89.c). Generation through the C API on a real quantized
// folder is tests/runtime/test_examples.py (cpp/examples/03_c_generate).
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "harness.hpp"
#include "osengine/runtime/c_api.h"

extern "C" int osengine_c89_smoke(void);

namespace fs = std::filesystem;

namespace {

bool contains(const std::string& text, const std::string& fragment) { return text.find(fragment) != std::string::npos; }

// Checks the status of `call` and that the thread's last error names `fragment`.
#define CHECK_STATUS(call, status, fragment)                                                         \
  do {                                                                                               \
    CHECK_EQ(std::string(osengine_status_name(call)), std::string(osengine_status_name(status)));    \
    const std::string ose_error = osengine_last_error();                                             \
    if (!contains(ose_error, fragment)) {                                                            \
      throw osengine_test::Failure(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": '" + \
                                   ose_error + "' lacks '" + (fragment) + "'");                      \
    }                                                                                                \
  } while (0)

// GPT-2's bytes_to_unicode as a JSON string literal (the characters below U+0800 need 2 bytes at most).
std::string byte_char_json(int b) {
  unsigned extra = 0, c = 0;
  for (int x = 0; x <= b; ++x) {
    const bool printable = (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174);
    c = printable ? static_cast<unsigned>(x) : 256 + extra++;
  }
  std::string s = "\"";
  if (c == '"' || c == '\\') {
    s += '\\';
    s += static_cast<char>(c);
  } else if (c < 0x80) {
    s += static_cast<char>(c);
  } else {
    s += static_cast<char>(0xC0 | (c >> 6));
    s += static_cast<char>(0x80 | (c & 0x3F));
  }
  return s + "\"";
}

// A byte-level BPE (GPT-2 regex): ids 0..255 the bytes, merges h+e=256 "he", t+he=257 "the", Ġ+c=258 "Ġc",
// a+t=259 "at", Ġc+at=260 "Ġcat"; <|end|> 261 (special).
std::string byte_level_json() {
  std::string vocab;
  for (int b = 0; b < 256; ++b) vocab += byte_char_json(b) + ": " + std::to_string(b) + ", ";
  vocab += R"("he": 256, "the": 257, "Ġc": 258, "at": 259, "Ġcat": 260)";
  return R"({"version": "1.0", "added_tokens": [
      {"id": 261, "content": "<|end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
    "normalizer": null,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
    "post_processor": null,
    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
      "fuse_unk": false, "byte_fallback": false, "vocab": {)" +
         vocab + R"(}, "merges": ["h e", "t he", "Ġ c", "a t", "Ġc at"]}})";
}

// A folder of its own under the temporary directory, removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name) {
    path = fs::temp_directory_path() / ("osengine_test_c_api_" + name + "_" + std::to_string(std::random_device{}()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path write(const std::string& file, const std::string& text) const {
    std::ofstream(path / file, std::ios::binary) << text;
    return path / file;
  }
};

struct Tokenizer {
  osengine_tokenizer* handle = nullptr;
  ~Tokenizer() { osengine_tokenizer_free(handle); }
};

}  // namespace

TEST(model_load_of_a_missing_folder_is_a_load_error_naming_it) {
  const std::string dir = (fs::temp_directory_path() / "osengine_no_such_model_folder").string();
  osengine_model* model = reinterpret_cast<osengine_model*>(&model);  // not written on failure
  osengine_model* const before = model;
  CHECK_STATUS(osengine_model_load(dir.c_str(), &model), OSENGINE_LOAD_ERROR, dir);
  CHECK(contains(osengine_last_error(), "osengine_model_load: "));
  CHECK(model == before);
  osengine_tokenizer* tokenizer = nullptr;
  CHECK_STATUS(osengine_tokenizer_load(dir.c_str(), &tokenizer), OSENGINE_LOAD_ERROR, dir);
  CHECK(tokenizer == nullptr);
}

TEST(null_pointers_are_invalid_arguments_naming_the_argument) {
  osengine_model* model = nullptr;
  CHECK_STATUS(osengine_model_load(nullptr, &model), OSENGINE_INVALID_ARGUMENT, "argument 'dir' is NULL");
  CHECK_STATUS(osengine_model_load("x", nullptr), OSENGINE_INVALID_ARGUMENT, "argument 'out_model' is NULL");
  std::int32_t value = 0;
  const char* name = nullptr;
  CHECK_STATUS(osengine_model_n_vocab(nullptr, &value), OSENGINE_INVALID_ARGUMENT, "'model'");
  CHECK_STATUS(osengine_model_n_ctx_train(nullptr, &value), OSENGINE_INVALID_ARGUMENT, "osengine_model_n_ctx_train");
  CHECK_STATUS(osengine_model_bos_token(nullptr, &value), OSENGINE_INVALID_ARGUMENT, "'model'");
  CHECK_STATUS(osengine_model_eos_token(nullptr, &value), OSENGINE_INVALID_ARGUMENT, "'model'");
  CHECK_STATUS(osengine_model_architecture(nullptr, &name), OSENGINE_INVALID_ARGUMENT, "'model'");

  osengine_context* context = nullptr;
  CHECK_STATUS(osengine_context_create(nullptr, 64, 16, 1, &context), OSENGINE_INVALID_ARGUMENT, "'model'");
  CHECK(context == nullptr);
  const std::int32_t tokens[2] = {1, 2};
  const float* logits = nullptr;
  CHECK_STATUS(osengine_context_decode(nullptr, tokens, 2, 0), OSENGINE_INVALID_ARGUMENT, "'context'");
  CHECK_STATUS(osengine_context_logits(nullptr, -1, &logits), OSENGINE_INVALID_ARGUMENT, "'context'");
  CHECK_STATUS(osengine_context_n_past(nullptr, &value), OSENGINE_INVALID_ARGUMENT, "'context'");
  CHECK_STATUS(osengine_context_kv_clear(nullptr), OSENGINE_INVALID_ARGUMENT, "'context'");
  CHECK_STATUS(osengine_context_kv_truncate(nullptr, 0), OSENGINE_INVALID_ARGUMENT, "osengine_context_kv_truncate");
  CHECK_STATUS(osengine_context_create_multi(nullptr, 64, 16, 1, 2, &context), OSENGINE_INVALID_ARGUMENT, "'model'");
  CHECK_STATUS(osengine_context_decode_seq(nullptr, 0, tokens, 2, 0), OSENGINE_INVALID_ARGUMENT, "'context'");
  const std::int32_t seqs[2] = {0, 1};
  CHECK_STATUS(osengine_context_decode_batch(nullptr, tokens, seqs, 2), OSENGINE_INVALID_ARGUMENT, "'context'");
  CHECK_STATUS(osengine_context_n_past_seq(nullptr, 0, &value), OSENGINE_INVALID_ARGUMENT, "'context'");
  CHECK_STATUS(osengine_context_kv_clear_seq(nullptr, -1), OSENGINE_INVALID_ARGUMENT, "'context'");
  CHECK_STATUS(osengine_context_kv_truncate_seq(nullptr, 0, 0), OSENGINE_INVALID_ARGUMENT, "'context'");
  CHECK_STATUS(osengine_model_load_with_flags(nullptr, 0, &model), OSENGINE_INVALID_ARGUMENT, "argument 'dir' is NULL");
  CHECK_STATUS(osengine_model_load_with_flags("x", 6u, &model), OSENGINE_INVALID_ARGUMENT,
               "argument 'flags' has unknown bits (6)");

  osengine_sampler* sampler = nullptr;
  CHECK_STATUS(osengine_sampler_create(0.0f, 0, 1.0f, 0, nullptr), OSENGINE_INVALID_ARGUMENT, "'out_sampler'");
  CHECK_STATUS(osengine_sampler_create(0.0f, 0, 1.0f, 0, &sampler), OSENGINE_OK, "");
  const float three[3] = {0.0f, 1.0f, 0.5f};
  CHECK_STATUS(osengine_sampler_sample(sampler, nullptr, 3, &value), OSENGINE_INVALID_ARGUMENT, "'logits'");
  CHECK_STATUS(osengine_sampler_sample(sampler, three, 3, nullptr), OSENGINE_INVALID_ARGUMENT, "'out_token'");
  CHECK_STATUS(osengine_sampler_sample(nullptr, three, 3, &value), OSENGINE_INVALID_ARGUMENT, "'sampler'");
  CHECK_STATUS(osengine_generate(nullptr, tokens, 2, 4, sampler, nullptr, nullptr, nullptr), OSENGINE_INVALID_ARGUMENT,
               "'context'");
  osengine_sampler_free(sampler);

  osengine_tokenizer* tokenizer = nullptr;
  std::size_t n = 0;
  char buffer[8];
  CHECK_STATUS(osengine_tokenizer_load(nullptr, &tokenizer), OSENGINE_INVALID_ARGUMENT, "'path'");
  CHECK_STATUS(osengine_tokenizer_load("tokenizer.json", nullptr), OSENGINE_INVALID_ARGUMENT, "'out_tokenizer'");
  CHECK_STATUS(osengine_tokenizer_encode(nullptr, "a", 1, 1, nullptr, 0, &n), OSENGINE_INVALID_ARGUMENT, "'tokenizer'");
  CHECK_STATUS(osengine_tokenizer_decode(nullptr, tokens, 2, 0, buffer, 8, &n), OSENGINE_INVALID_ARGUMENT,
               "'tokenizer'");
  CHECK_STATUS(osengine_tokenizer_token_to_piece(nullptr, 1, buffer, 8, &n), OSENGINE_INVALID_ARGUMENT, "'tokenizer'");
  CHECK_STATUS(osengine_tokenizer_vocab_size(nullptr, &value), OSENGINE_INVALID_ARGUMENT, "'tokenizer'");
  CHECK_STATUS(osengine_utf8_complete_prefix(nullptr, 3, &n), OSENGINE_INVALID_ARGUMENT, "'bytes'");
  CHECK_STATUS(osengine_utf8_complete_prefix("abc", 3, nullptr), OSENGINE_INVALID_ARGUMENT, "'out_prefix'");
  // the free functions take NULL
  osengine_model_free(nullptr);
  osengine_context_free(nullptr);
  osengine_sampler_free(nullptr);
  osengine_tokenizer_free(nullptr);
}

TEST(bad_values_are_invalid_arguments_naming_the_argument) {
  osengine_sampler* sampler = nullptr;
  CHECK_STATUS(osengine_sampler_create(-1.0f, 0, 1.0f, 0, &sampler), OSENGINE_INVALID_ARGUMENT, "'temperature'");
  CHECK_STATUS(osengine_sampler_create(1.0f, -2, 1.0f, 0, &sampler), OSENGINE_INVALID_ARGUMENT, "'top_k'");
  CHECK_STATUS(osengine_sampler_create(1.0f, 0, 0.0f, 0, &sampler), OSENGINE_INVALID_ARGUMENT, "'top_p'");
  CHECK(sampler == nullptr);
  CHECK_STATUS(osengine_sampler_create(0.0f, 0, 1.0f, 0, &sampler), OSENGINE_OK, "");
  const float logits[4] = {0.5f, -1.0f, 3.0f, 2.0f};
  std::int32_t token = -1;
  CHECK_STATUS(osengine_sampler_sample(sampler, logits, 0, &token), OSENGINE_INVALID_ARGUMENT,
               "argument 'n_vocab' must be positive, got 0");
  CHECK_STATUS(osengine_sampler_sample(sampler, logits, 4, &token), OSENGINE_OK, "");
  CHECK_EQ(token, 2);  // greedy
  osengine_sampler_free(sampler);
}

TEST(last_error_is_cleared_by_success_and_kept_per_thread) {
  osengine_model* model = nullptr;
  CHECK(osengine_model_load(nullptr, &model) == OSENGINE_INVALID_ARGUMENT);
  CHECK(contains(osengine_last_error(), "'dir'"));
  // another thread's failure is not this thread's error, and this thread's is not the other's
  std::string other;
  std::thread([&] {
    other = osengine_last_error();
    osengine_tokenizer* tokenizer = nullptr;
    (void)osengine_tokenizer_load(nullptr, &tokenizer);
  }).join();
  CHECK_EQ(other, std::string(""));
  CHECK(contains(osengine_last_error(), "'dir'"));
  std::size_t prefix = 0;
  CHECK(osengine_utf8_complete_prefix("ab", 2, &prefix) == OSENGINE_OK);
  CHECK_EQ(std::string(osengine_last_error()), std::string(""));
  CHECK_EQ(prefix, std::size_t{2});
  CHECK_EQ(std::string(osengine_status_name(OSENGINE_LOAD_ERROR)), std::string("OSENGINE_LOAD_ERROR"));
}

TEST(tokenizer_encode_and_decode_with_two_call_buffers) {
  TempDir dir("tokenizer");
  const fs::path file = dir.write("tokenizer.json", byte_level_json());
  Tokenizer tok, from_folder;
  CHECK_STATUS(osengine_tokenizer_load(file.string().c_str(), &tok.handle), OSENGINE_OK, "");
  CHECK_STATUS(osengine_tokenizer_load(dir.path.string().c_str(), &from_folder.handle), OSENGINE_OK, "");
  std::int32_t vocab_size = 0;
  CHECK(osengine_tokenizer_vocab_size(from_folder.handle, &vocab_size) == OSENGINE_OK);
  CHECK_EQ(vocab_size, 262);

  // encode: size query, too small (nothing written, the size given), enough
  const std::string text = "the cat<|end|>";
  std::size_t n = 0;
  CHECK_STATUS(osengine_tokenizer_encode(tok.handle, text.data(), text.size(), 1, nullptr, 0, &n), OSENGINE_OK, "");
  CHECK_EQ(n, std::size_t{3});
  std::vector<std::int32_t> ids(2, -7);
  n = 0;
  CHECK_STATUS(osengine_tokenizer_encode(tok.handle, text.data(), text.size(), 1, ids.data(), ids.size(), &n),
               OSENGINE_BUFFER_TOO_SMALL, "argument 'ids': capacity 2 is too small, 3 ids are needed");
  CHECK_EQ(n, std::size_t{3});
  CHECK(ids[0] == -7 && ids[1] == -7);
  ids.assign(n, 0);
  CHECK_STATUS(osengine_tokenizer_encode(tok.handle, text.data(), text.size(), 1, ids.data(), ids.size(), &n),
               OSENGINE_OK, "");
  CHECK(ids == (std::vector<std::int32_t>{257, 260, 261}));
  CHECK_STATUS(osengine_tokenizer_encode(tok.handle, text.data(), text.size(), 1, nullptr, 4, &n),
               OSENGINE_INVALID_ARGUMENT, "argument 'ids' is NULL but capacity is 4");
  CHECK_STATUS(osengine_tokenizer_encode(tok.handle, nullptr, 0, 1, nullptr, 0, &n), OSENGINE_OK, "");  // empty text
  CHECK_EQ(n, std::size_t{0});
  CHECK_STATUS(osengine_tokenizer_encode(tok.handle, nullptr, 5, 1, nullptr, 0, &n), OSENGINE_INVALID_ARGUMENT,
               "argument 'text' is NULL");
  // the length is the caller's: bytes after it (and NULs inside) are not read as the end
  CHECK(osengine_tokenizer_encode(tok.handle, "the cat", 3, 1, ids.data(), ids.size(), &n) == OSENGINE_OK);
  CHECK_EQ(n, std::size_t{1});
  CHECK_EQ(ids[0], 257);

  // decode: "the cat<|end|>" needs 15 bytes with its NUL
  const std::int32_t cat[3] = {257, 260, 261};
  std::size_t len = 0;
  CHECK_STATUS(osengine_tokenizer_decode(tok.handle, cat, 3, 0, nullptr, 0, &len), OSENGINE_OK, "");
  CHECK_EQ(len, std::size_t{14});
  std::vector<char> small(14, 'x');
  CHECK_STATUS(osengine_tokenizer_decode(tok.handle, cat, 3, 0, small.data(), small.size(), &len),
               OSENGINE_BUFFER_TOO_SMALL, "capacity 14 is too small, 15 bytes");
  CHECK_EQ(len, std::size_t{14});
  CHECK(small[0] == 'x');
  std::vector<char> text_out(len + 1, 'x');
  CHECK_STATUS(osengine_tokenizer_decode(tok.handle, cat, 3, 0, text_out.data(), text_out.size(), &len), OSENGINE_OK,
               "");
  CHECK_EQ(std::string(text_out.data()), std::string("the cat<|end|>"));
  CHECK(osengine_tokenizer_decode(tok.handle, cat, 3, 1, text_out.data(), text_out.size(), &len) == OSENGINE_OK);
  CHECK_EQ(std::string(text_out.data(), len), std::string("the cat"));  // special tokens skipped
  CHECK(osengine_tokenizer_decode(tok.handle, nullptr, 0, 0, text_out.data(), text_out.size(), &len) == OSENGINE_OK);
  CHECK_EQ(len, std::size_t{0});
  CHECK_EQ(text_out[0], '\0');
  const std::int32_t outside[2] = {257, 262};
  CHECK_STATUS(osengine_tokenizer_decode(tok.handle, outside, 2, 0, text_out.data(), text_out.size(), &len),
               OSENGINE_INVALID_ARGUMENT, "token id 262 is outside the vocabulary [0, 262)");

  // pieces: bytes of one token, NUL-terminated; a lone UTF-8 lead byte stays a raw byte
  char piece[8];
  CHECK(osengine_tokenizer_token_to_piece(tok.handle, 260, piece, sizeof piece, &len) == OSENGINE_OK);
  CHECK_EQ(std::string(piece, len), std::string(" cat"));
  CHECK_EQ(piece[len], '\0');
  CHECK(osengine_tokenizer_token_to_piece(tok.handle, 0xE6, piece, sizeof piece, &len) == OSENGINE_OK);
  CHECK_EQ(std::string(piece, len), std::string("\xe6"));
  CHECK_STATUS(osengine_tokenizer_token_to_piece(tok.handle, 260, piece, 4, &len), OSENGINE_BUFFER_TOO_SMALL,
               "argument 'piece': capacity 4 is too small, 5 bytes");
  CHECK_EQ(len, std::size_t{4});
  CHECK_STATUS(osengine_tokenizer_token_to_piece(tok.handle, -1, piece, sizeof piece, &len), OSENGINE_INVALID_ARGUMENT,
               "outside the vocabulary");

  // streaming a split character: 日 is E6 97 A5
  std::size_t prefix = 9;
  CHECK(osengine_utf8_complete_prefix("a\xe6\x97", 3, &prefix) == OSENGINE_OK);
  CHECK_EQ(prefix, std::size_t{1});
  CHECK(osengine_utf8_complete_prefix("a\xe6\x97\xa5", 4, &prefix) == OSENGINE_OK);
  CHECK_EQ(prefix, std::size_t{4});
  CHECK(osengine_utf8_complete_prefix(nullptr, 0, &prefix) == OSENGINE_OK);
  CHECK_EQ(prefix, std::size_t{0});
}

TEST(broken_tokenizer_json_is_a_load_error_naming_the_file) {
  TempDir dir("broken");
  const fs::path file = dir.write("tokenizer.json", "{\"model\": ");
  Tokenizer tok;
  CHECK_STATUS(osengine_tokenizer_load(file.string().c_str(), &tok.handle), OSENGINE_LOAD_ERROR, file.string());
  CHECK(contains(osengine_last_error(), "not valid JSON"));
  CHECK(tok.handle == nullptr);
  const fs::path unsupported = dir.write("unigram.json", R"({"model": {"type": "Unigram", "vocab": []}})");
  CHECK_STATUS(osengine_tokenizer_load(unsupported.string().c_str(), &tok.handle), OSENGINE_LOAD_ERROR,
               "model type \"Unigram\"");
}

TEST(the_header_compiles_and_runs_as_c89) { CHECK_EQ(osengine_c89_smoke(), 0); }

OSENGINE_TEST_MAIN
