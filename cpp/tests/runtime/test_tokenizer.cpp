// The runtime's tokenizer on small hand-written tokenizer.json files, one per supported component (the ids were worked
// out by hand from the merges), plus the refusals and errors: unsupported components named, malformed JSON, ids
// outside the vocabulary, invalid UTF-8 and empty input. Agreement with transformers on real and trained tokenizers
// is tests/runtime/test_native_tokenizer.py.
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "harness.hpp"
#include "osengine/errors.hpp"
#include "osengine/runtime/errors.hpp"
#include "osengine/runtime/tokenizer.hpp"

using osengine::ArgumentError;
using osengine::runtime::LoadError;
using osengine::runtime::Tokenizer;

namespace {

std::string str(const std::vector<std::int32_t>& ids) {
  std::string s;
  for (std::size_t i = 0; i < ids.size(); ++i) s += (i ? " " : "") + std::to_string(ids[i]);
  return s;
}

void append_utf8(std::string& out, unsigned c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

// GPT-2's bytes_to_unicode, written out as a JSON string literal (the characters below U+0800 need 2 bytes at most).
std::string byte_char_json(int b) {
  static std::vector<unsigned> chars = [] {
    std::vector<unsigned> c(256);
    unsigned extra = 0;
    for (unsigned x = 0; x < 256; ++x) {
      const bool printable = (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174);
      c[x] = printable ? x : 256 + extra++;
    }
    return c;
  }();
  const unsigned c = chars[static_cast<std::size_t>(b)];
  if (c == '"') return "\"\\\"\"";
  if (c == '\\') return "\"\\\\\"";
  std::string s = "\"";
  append_utf8(s, c);
  return s + "\"";
}

// A byte-level BPE: ids 0..255 are the bytes (the byte-level character of byte b has id b), then merges
// h+e=256 "he", t+he=257 "the", Ġ+c=258 "Ġc", a+t=259 "at", Ġc+at=260 "Ġcat"; added tokens <|end|> (261, special)
// and <|begin|> (262, special).
const std::string kByteLevelDecoder =
    R"({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true})";

std::string byte_level_json(const std::string& pre_tokenizer, const std::string& post_processor = "null",
                            bool ignore_merges = false, const std::string& extra_vocab = "",
                            const std::string& normalizer = "null", const std::string& decoder = kByteLevelDecoder) {
  std::string vocab;
  for (int b = 0; b < 256; ++b) vocab += byte_char_json(b) + ": " + std::to_string(b) + ", ";
  vocab += R"("he": 256, "the": 257, "Ġc": 258, "at": 259, "Ġcat": 260)" + extra_vocab;
  return R"({"version": "1.0", "truncation": null, "padding": null,
    "added_tokens": [
      {"id": 261, "content": "<|end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
      {"id": 262, "content": "<|begin|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
    "normalizer": )" + normalizer + R"(, "pre_tokenizer": )" + pre_tokenizer + R"(, "post_processor": )" +
         post_processor + R"(, "decoder": )" + decoder + R"(,
    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
      "fuse_unk": false, "byte_fallback": false, "ignore_merges": )" +
         (ignore_merges ? "true" : "false") + R"(, "vocab": {)" + vocab +
         R"(}, "merges": ["h e", ["t", "he"], "Ġ c", ["a", "t"], "Ġc at"]}})";
}

const std::string kGpt2PreTokenizer =
    R"({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})";

// LLaMA-3's pre-tokenizer: a Split regex, then ByteLevel without its own regex.
const std::string kLlama3PreTokenizer = R"({"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": false},
    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})";

const std::string kBosTemplate = R"({"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<|begin|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [], "special_tokens": {"<|begin|>": {"id": "<|begin|>", "ids": [262], "tokens": ["<|begin|>"]}}})";

// A SentencePiece-style BPE (LLaMA-2): <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258, then ▁ 259, h 260, i 261,
// ▁h 262, ▁hi 263, e 264.
std::string sentencepiece_json(const std::string& normalizer, const std::string& pre_tokenizer,
                               const std::string& decoder, bool byte_fallback = true, bool fuse_unk = true) {
  std::string vocab = R"("<unk>": 0, "<s>": 1, "</s>": 2, )";
  static const char* hex = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b)
    vocab += std::string("\"<0x") + hex[b >> 4] + hex[b & 15] + ">\": " + std::to_string(3 + b) + ", ";
  vocab += R"("▁": 259, "h": 260, "i": 261, "▁h": 262, "▁hi": 263, "e": 264)";
  return R"({"version": "1.0", "added_tokens": [
      {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
      {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
      {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
    "normalizer": )" +
         normalizer + R"(, "pre_tokenizer": )" + pre_tokenizer + R"(,
    "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
      "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
    "decoder": )" + decoder + R"(,
    "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
      "end_of_word_suffix": null, "fuse_unk": )" +
         (fuse_unk ? "true" : "false") + R"(, "byte_fallback": )" + (byte_fallback ? "true" : "false") +
         R"(, "vocab": {)" + vocab + R"(}, "merges": ["▁ h", "▁h i"]}})";
}

const std::string kLlama2Normalizer = R"({"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})";
const std::string kLlama2Decoder = R"({"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]})";

}  // namespace

TEST(byte_level_gpt2_regex) {
  const auto tok = Tokenizer::from_json_string(byte_level_json(kGpt2PreTokenizer));
  CHECK_EQ(tok.vocab_size(), 263);
  CHECK_EQ(str(tok.encode("the cat")), std::string("257 260"));
  // "  cat!" -> " " (\s+(?!\S)), " cat", "!"
  CHECK_EQ(str(tok.encode("the  cat!")), std::string("257 32 260 33"));
  CHECK_EQ(str(tok.encode("cat's")), std::string("99 259 39 115"));
  CHECK_EQ(tok.decode(tok.encode("the  cat!")), std::string("the  cat!"));
  CHECK_EQ(tok.bos_token_id(), -1);
  CHECK_EQ(tok.token_id("Ġcat"), 260);
  CHECK_EQ(tok.token_id("<|end|>"), 261);
  CHECK_EQ(tok.token_id("nope"), -1);
  CHECK_EQ(tok.id_to_token(258), std::string("Ġc"));
}

TEST(byte_level_add_prefix_space) {
  const auto tok = Tokenizer::from_json_string(byte_level_json(
      R"({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true})"));
  CHECK_EQ(str(tok.encode("cat")), std::string("260"));
  CHECK_EQ(str(tok.encode(" cat")), std::string("260"));  // not twice
  CHECK_EQ(tok.decode({260}), std::string(" cat"));
}

TEST(added_tokens_split_first_and_skipped_when_special) {
  const auto tok = Tokenizer::from_json_string(byte_level_json(kGpt2PreTokenizer));
  CHECK_EQ(str(tok.encode("the<|end|>cat")), std::string("257 261 99 259"));
  CHECK_EQ(str(tok.encode("<|end|><|begin|>")), std::string("261 262"));
  CHECK_EQ(str(tok.encode("<|end|")), std::string("60 124 101 110 100 124"));  // incomplete: plain text
  CHECK_EQ(tok.decode({257, 261, 260}), std::string("the<|end|> cat"));
  CHECK_EQ(tok.decode({257, 261, 260}, true), std::string("the cat"));
  CHECK(tok.is_special(261));
  CHECK(!tok.is_special(257));
  CHECK_EQ(tok.token_to_piece(261), std::string("<|end|>"));
}

TEST(template_processing_adds_bos) {
  const auto tok = Tokenizer::from_json_string(byte_level_json(kGpt2PreTokenizer, kBosTemplate));
  CHECK_EQ(tok.bos_token_id(), 262);
  CHECK_EQ(str(tok.encode("the cat")), std::string("262 257 260"));
  CHECK_EQ(str(tok.encode("the cat", false)), std::string("257 260"));
  CHECK_EQ(str(tok.encode("")), std::string("262"));
  CHECK_EQ(tok.decode(tok.encode("the cat"), true), std::string("the cat"));
  // a Sequence of ByteLevel and TemplateProcessing (LLaMA-3)
  const auto seq = Tokenizer::from_json_string(byte_level_json(
      kGpt2PreTokenizer, R"({"type": "Sequence", "processors": [{"type": "ByteLevel", "trim_offsets": false}, )" +
                             kBosTemplate + "]}"));
  CHECK_EQ(str(seq.encode("the cat")), std::string("262 257 260"));
}

TEST(split_regex_then_byte_level_and_ignore_merges) {
  // "Ġcatat" is in the vocabulary but no merge makes it: only ignore_merges emits it whole.
  const std::string extra = R"(, "Ġcatat": 263)";
  const auto plain = Tokenizer::from_json_string(byte_level_json(kLlama3PreTokenizer, "null", false, extra));
  const auto ignore = Tokenizer::from_json_string(byte_level_json(kLlama3PreTokenizer, "null", true, extra));
  CHECK_EQ(str(plain.encode("the catat")), std::string("257 260 259"));
  CHECK_EQ(str(ignore.encode("the catat")), std::string("257 263"));
  // \p{N}{1,3}: digits in threes; "'S" case-insensitively
  CHECK_EQ(str(plain.encode("12345")), std::string("49 50 51 52 53"));
  CHECK_EQ(plain.decode(plain.encode("the cat'S 12345\n\n x")), std::string("the cat'S 12345\n\n x"));
}

TEST(digits_pre_tokenizer) {
  const std::string pre = R"({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]})";
  const auto tok = Tokenizer::from_json_string(byte_level_json(pre));
  CHECK_EQ(str(tok.encode("at12")), std::string("259 49 50"));
  CHECK_EQ(tok.decode(tok.encode("a1b22 ٣")), std::string("a1b22 ٣"));
}

TEST(invalid_utf8_becomes_replacement_characters) {
  const auto tok = Tokenizer::from_json_string(byte_level_json(kGpt2PreTokenizer));
  // U+FFFD is EF BF BD: each maximal invalid subpart becomes one, as Python's errors="replace"
  CHECK_EQ(str(tok.encode("\xff")), std::string("239 191 189"));
  CHECK_EQ(str(tok.encode("a\xe2\x82z")), std::string("97 239 191 189 122"));
  CHECK_EQ(str(tok.encode("\xed\xa0\x80")), std::string("239 191 189 239 191 189 239 191 189"));
  CHECK_EQ(tok.decode(tok.encode("the \xc3(cat")), std::string("the \xef\xbf\xbd(cat"));
  // a lone byte decodes to U+FFFD; as a piece it stays the raw byte (for streaming)
  CHECK_EQ(tok.decode({255}), std::string("\xef\xbf\xbd"));
  CHECK_EQ(tok.token_to_piece(255), std::string("\xff"));
  // every single byte and every pair of bytes: no crash, and valid UTF-8 decodes back unchanged
  for (int a = 0; a < 256; ++a) {
    std::string s(1, static_cast<char>(a));
    (void)tok.encode(s);
    for (int b = 0; b < 256; b += 7) (void)tok.decode(tok.encode(s + static_cast<char>(b)));
  }
}

TEST(empty_input) {
  const auto tok = Tokenizer::from_json_string(byte_level_json(kGpt2PreTokenizer));
  CHECK(tok.encode("").empty());
  CHECK_EQ(tok.decode({}), std::string(""));
  const auto sp = Tokenizer::from_json_string(sentencepiece_json(kLlama2Normalizer, "null", kLlama2Decoder));
  CHECK_EQ(str(sp.encode("")), std::string("1"));
  CHECK(sp.encode("", false).empty());
}

TEST(streaming_pieces) {
  const auto tok = Tokenizer::from_json_string(byte_level_json(kGpt2PreTokenizer));
  const std::string text = "the cat é 日本 🙂!";
  std::string streamed, pending;
  for (std::int32_t id : tok.encode(text)) {
    pending += tok.token_to_piece(id);
    const std::size_t n = Tokenizer::utf8_complete_prefix(pending);
    streamed += pending.substr(0, n);
    pending.erase(0, n);
  }
  CHECK(pending.empty());
  CHECK_EQ(streamed, text);
  CHECK_EQ(Tokenizer::utf8_complete_prefix("a\xf0\x9f\x99"), std::size_t{1});
  CHECK_EQ(Tokenizer::utf8_complete_prefix("a\xf0\x9f\x99\x82"), std::size_t{5});
  CHECK_EQ(Tokenizer::utf8_complete_prefix("a\xff"), std::size_t{2});
  CHECK_EQ(Tokenizer::utf8_complete_prefix(""), std::size_t{0});
}

TEST(sentencepiece_normalizer_byte_fallback) {
  const auto tok = Tokenizer::from_json_string(sentencepiece_json(kLlama2Normalizer, "null", kLlama2Decoder));
  CHECK_EQ(tok.bos_token_id(), 1);
  CHECK_EQ(str(tok.encode("hi hi", false)), std::string("263 263"));
  CHECK_EQ(str(tok.encode("hi hi")), std::string("1 263 263"));
  // é is not in the vocabulary: its bytes C3 A9 as <0xC3> <0xA9>
  CHECK_EQ(str(tok.encode("hé", false)), std::string("262 198 172"));
  CHECK_EQ(tok.decode(tok.encode("hé hi")), std::string("<s> hé hi"));
  CHECK_EQ(tok.decode(tok.encode("hé hi"), true), std::string("hé hi"));
  CHECK_EQ(tok.decode({262, 198}), std::string("h\xef\xbf\xbd"));  // a lone lead byte: U+FFFD
  CHECK_EQ(tok.token_to_piece(262), std::string(" h"));
  CHECK_EQ(tok.token_to_piece(198), std::string("\xc3"));
  // the text between added tokens is normalized piece by piece: "▁" prepended to each
  CHECK_EQ(str(tok.encode("hi</s>hi", false)), std::string("263 2 263"));
}

TEST(sentencepiece_unk_without_byte_fallback) {
  const auto fused = Tokenizer::from_json_string(sentencepiece_json(kLlama2Normalizer, "null", kLlama2Decoder, false));
  CHECK_EQ(str(fused.encode("hxyi", false)), std::string("262 0 261"));
  const auto unfused =
      Tokenizer::from_json_string(sentencepiece_json(kLlama2Normalizer, "null", kLlama2Decoder, false, false));
  CHECK_EQ(str(unfused.encode("hxyi", false)), std::string("262 0 0 261"));
}

TEST(metaspace_pre_tokenizer_and_decoder) {
  const std::string first = R"({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false})";
  const auto tok = Tokenizer::from_json_string(sentencepiece_json("null", first, first));
  CHECK_EQ(str(tok.encode("hi hi", false)), std::string("263 263"));
  // "first": only the text at the start of the input gets the ▁
  CHECK_EQ(str(tok.encode("<s>hi", false)), std::string("1 260 261"));
  CHECK_EQ(tok.decode({263, 263}), std::string("hi hi"));
  const std::string always = R"({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true})";
  const auto tok2 = Tokenizer::from_json_string(sentencepiece_json("null", always, always));
  CHECK_EQ(str(tok2.encode("<s>hi hi", false)), std::string("1 263 263"));
  // legacy add_prefix_space = false means prepend_scheme "never"
  const std::string never = R"({"type": "Metaspace", "replacement": "▁", "add_prefix_space": false})";
  const auto tok3 = Tokenizer::from_json_string(sentencepiece_json("null", never, never));
  CHECK_EQ(str(tok3.encode("hi", false)), std::string("260 261"));
}

TEST(added_token_lstrip_rstrip_and_normalized) {
  std::string json = byte_level_json(kGpt2PreTokenizer);
  const std::string marker = R"("added_tokens": [)";
  json.insert(json.find(marker) + marker.size(),
              R"({"id": 263, "content": "<m>", "single_word": false, "lstrip": true, "rstrip": true, "normalized": false, "special": false},
                 {"id": 264, "content": "cat", "single_word": true, "lstrip": false, "rstrip": false, "normalized": true, "special": false},)");
  const auto tok = Tokenizer::from_json_string(json);
  CHECK_EQ(str(tok.encode("the  <m>  the")), std::string("257 263 257"));
  CHECK_EQ(str(tok.encode("the cat")), std::string("257 32 264"));   // a single word: the added token
  CHECK_EQ(str(tok.encode("thecat")), std::string("257 99 259"));    // inside a word: not
  CHECK_EQ(tok.decode({257, 263, 257}), std::string("the<m>the"));
}

TEST(unsupported_components_are_named) {
  const auto normalizer = [](const std::string& n) { return byte_level_json(kGpt2PreTokenizer, "null", false, "", n); };
  const auto pre = [](const std::string& p) { return byte_level_json(p); };
  CHECK_THROWS(Tokenizer::from_json_string(normalizer(R"({"type": "NFC"})"), "t.json"), LoadError, "normalizer \"NFC\"");
  CHECK_THROWS(Tokenizer::from_json_string(normalizer(R"({"type": "NFC"})"), "t.json"), LoadError, "t.json");
  CHECK_THROWS(Tokenizer::from_json_string(normalizer(R"({"type": "Lowercase"})")), LoadError, "Lowercase");
  CHECK_THROWS(Tokenizer::from_json_string(pre(R"({"type": "Whitespace"})")), LoadError,
               "pre_tokenizer \"Whitespace\"");
  CHECK_THROWS(Tokenizer::from_json_string(byte_level_json(kGpt2PreTokenizer, R"({"type": "BertProcessing"})")),
               LoadError, "post_processor \"BertProcessing\"");
  CHECK_THROWS(Tokenizer::from_json_string(
                   byte_level_json(kGpt2PreTokenizer, "null", false, "", "null", R"({"type": "WordPiece"})")),
               LoadError, "decoder \"WordPiece\"");
  CHECK_THROWS(Tokenizer::from_json_string(R"({"model": {"type": "Unigram", "vocab": []}})"), LoadError,
               "model type \"Unigram\"");
  CHECK_THROWS(Tokenizer::from_json_string(pre(R"({"type": "Split", "pattern": {"Regex": "(["},
      "behavior": "Isolated", "invert": false})")), LoadError, "does not compile");
  std::string bad_merge = byte_level_json(kGpt2PreTokenizer);
  bad_merge.replace(bad_merge.find("\"h e\""), 5, "\"h q2\"");
  CHECK_THROWS(Tokenizer::from_json_string(bad_merge), LoadError, "\"q2\", which is not in the vocab");
}

TEST(malformed_files) {
  CHECK_THROWS(Tokenizer::from_json_string("{\"model\": ", "broken.json"), LoadError, "broken.json");
  CHECK_THROWS(Tokenizer::from_json_string("{\"model\": ", "broken.json"), LoadError, "not valid JSON");
  CHECK_THROWS(Tokenizer::from_json_string("[1, 2]"), LoadError, "top level must be an object");
  CHECK_THROWS(Tokenizer::from_json_string("{}"), LoadError, "has no \"model\"");
  CHECK_THROWS(Tokenizer::from_json_string(R"({"model": {"type": "BPE", "vocab": {"a": "x"}, "merges": []}})"),
               LoadError, "model.vocab[\"a\"] must be a non-negative id");
  CHECK_THROWS(Tokenizer::from_json_string(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [3]}})"),
               LoadError, "model.merges[0]");
  CHECK_THROWS(Tokenizer::from_file("/nonexistent/tokenizer.json"), LoadError, "/nonexistent/tokenizer.json");
}

TEST(ids_outside_the_vocabulary) {
  const auto tok = Tokenizer::from_json_string(byte_level_json(kGpt2PreTokenizer));
  CHECK_THROWS(tok.decode({1, 263}), ArgumentError, "token id 263 is outside the vocabulary [0, 263)");
  CHECK_THROWS(tok.decode({-1}), ArgumentError, "token id -1");
  CHECK_THROWS(tok.token_to_piece(100000), ArgumentError, "outside the vocabulary");
}

TEST(threads_share_one_tokenizer) {
  const auto tok = Tokenizer::from_json_string(byte_level_json(kGpt2PreTokenizer));
  const std::string text = "the cat at the cat's 123 the  cat!";
  const auto expected = tok.encode(text);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      bool same = true;
      for (int i = 0; i < 200; ++i) same = same && tok.encode(text + std::to_string(i % 3)).size() >= expected.size();
      ok[static_cast<std::size_t>(t)] = same ? 1 : 0;
    });
  for (auto& th : threads) th.join();
  for (int v : ok) CHECK_EQ(v, 1);
}

OSENGINE_TEST_MAIN
