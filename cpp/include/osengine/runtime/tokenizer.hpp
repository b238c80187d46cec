// The tokenizer of the native runtime: a Hugging Face tokenizer.json read in C++, giving the same ids as the
// transformers fast tokenizer (the `tokenizers` library) for the BPE families the runtime runs:
//   - byte-level BPE (GPT-2, SmolLM2, Qwen2, LLaMA-3): ByteLevel pre-tokenizer with the GPT-2 regex, or a Split
//     regex from the file followed by ByteLevel(use_regex=false), optionally Digits; ignore_merges; ByteLevel decoder;
//   - SentencePiece-style BPE (LLaMA-2, Mistral): Prepend/Replace normalizer and/or Metaspace pre-tokenizer,
//     byte_fallback (<0xXX> tokens) and unk_token; the Replace/ByteFallback/Fuse/Strip or Metaspace decoder;
//   - added tokens (special or not) split out of the raw text first; TemplateProcessing's special tokens (e.g. a BOS)
//     with add_special_tokens.
// Any other model, normalizer, pre-tokenizer, post-processor or decoder is refused by name when the file is loaded
// (docs/runtime.md, "Tokenizer"). Errors: LoadError naming the file for anything wrong with tokenizer.json;
// osengine::ArgumentError for an id outside the vocabulary.
//
// Text is UTF-8. Invalid UTF-8 in encode's input is first made valid the way Python's
// bytes.decode("utf-8", "replace") does (each maximal invalid subsequence becomes U+FFFD), so the ids are those
// transformers gives for that string; nothing in the input can crash or hang the tokenizer.
//
// Immutable once loaded; encode / decode may be called from several threads at once (the word cache is locked).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace osengine::runtime {

namespace detail {
struct TokenizerImpl;
}

class Tokenizer {
 public:
  // Reads a tokenizer.json (LoadError naming the file when it is missing, not JSON, or uses an unsupported component).
  static Tokenizer from_file(const std::string& tokenizer_json_path);
  // The same from the file's contents; `origin` names it in error messages.
  static Tokenizer from_json_string(const std::string& json, const std::string& origin = "tokenizer.json string");

  // Token ids of `text`; with add_special_tokens the post-processor's special tokens (e.g. LLaMA-3's BOS) are added.
  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens = true) const;

  // The text of `ids` as the tokenizer's decoder writes it (tokenizers' Tokenizer::decode; transformers' decode with
  // clean_up_tokenization_spaces=False). Byte sequences that are not valid UTF-8 become U+FFFD. Special tokens are
  // left out with skip_special_tokens. ArgumentError for an id outside [0, vocab_size()) or without a token.
  std::string decode(const std::vector<std::int32_t>& ids, bool skip_special_tokens = false) const;

  // The bytes one token stands for in the middle of a text, for streaming output: the byte-level character map
  // undone, "▁" as a space, <0xXX> as that byte, an added token as its content. A piece may be part of a multi-byte
  // UTF-8 character (byte-level BPE and byte fallback split characters across tokens), so a streaming caller keeps
  // the bytes not yet written and writes only complete characters (utf8_complete_prefix below), flushing the rest
  // (or U+FFFD) at the end. decode() also strips the sequence's first leading space where the decoder says so
  // (SentencePiece's Strip / Metaspace); a piece never does, so a stream of pieces may start with one extra space.
  // ArgumentError for an id outside the vocabulary.
  std::string token_to_piece(std::int32_t id) const;

  // One more than the largest token id (model vocabulary and added tokens): transformers' len(tokenizer).
  std::int32_t vocab_size() const;
  // The id of a token string (as stored in the vocabulary, e.g. "Ġthe" or "<|im_end|>"), -1 if there is none.
  std::int32_t token_id(std::string_view token) const;
  // The token string of an id (ArgumentError when outside the vocabulary).
  std::string id_to_token(std::int32_t id) const;
  // Whether `id` is an added token marked special (skipped by decode with skip_special_tokens).
  bool is_special(std::int32_t id) const;
  // The BOS id when the file makes it known: the special token the TemplateProcessing post-processor puts before a
  // single sequence (LLaMA-2, LLaMA-3); -1 otherwise. tokenizer.json does not name an EOS token: take bos/eos from
  // the model's config.json (ModelInfo::bos_token_id / eos_token_id), which is authoritative.
  std::int32_t bos_token_id() const;

  // The length of the longest prefix of `bytes` that does not end inside a UTF-8 character that later bytes could
  // still complete (for streaming token_to_piece output); invalid bytes count as complete (they decode to U+FFFD).
  static std::size_t utf8_complete_prefix(std::string_view bytes);

 private:
  explicit Tokenizer(std::shared_ptr<const detail::TokenizerImpl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const detail::TokenizerImpl> impl_;
};

}  // namespace osengine::runtime
