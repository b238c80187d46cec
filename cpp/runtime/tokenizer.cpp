// The runtime's tokenizer: tokenizer.json (Hugging Face `tokenizers`) read with nlohmann/json, pre-tokenizer regexes
// run by PCRE2, BPE merges as in tokenizers' models/bpe (a min-heap over (rank, position) on a linked list of
// symbols), so that the ids are those of the transformers fast tokenizer. Each step below names the tokenizers source
// it follows; docs/runtime.md ("Tokenizer") lists what is supported and what is refused.
#include "osengine/runtime/tokenizer.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "osengine/errors.hpp"
#include "osengine/runtime/errors.hpp"

namespace osengine::runtime {
namespace {

using nlohmann::json;

// ---- UTF-8 -----------------------------------------------------------------------------------------------------

// The well-formed UTF-8 sequence at s[i]: its length (1..4), or minus the length of the maximal invalid subpart
// there (Unicode's "maximal subpart" rule, which Rust's from_utf8_lossy and Python's errors="replace" follow).
int utf8_sequence(std::string_view s, std::size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return 1;
  int need = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
  } else if (b0 == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((b0 >= 0xE1 && b0 <= 0xEC) || b0 == 0xEE || b0 == 0xEF) {
    need = 2;
  } else if (b0 == 0xED) {
    need = 2, hi = 0x9F;
  } else if (b0 == 0xF0) {
    need = 3, lo = 0x90;
  } else if (b0 >= 0xF1 && b0 <= 0xF3) {
    need = 3;
  } else if (b0 == 0xF4) {
    need = 3, hi = 0x8F;
  } else {
    return -1;
  }
  for (int k = 1; k <= need; ++k) {
    const std::size_t j = i + static_cast<std::size_t>(k);
    if (j >= s.size()) return -k;
    const auto b = static_cast<unsigned char>(s[j]);
    if (b < lo || b > hi) return -k;
    lo = 0x80, hi = 0xBF;
  }
  return need + 1;
}

constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// `s` with every maximal invalid subpart replaced by U+FFFD; returns false (and leaves `out` alone) when s is valid.
bool make_valid_utf8(std::string_view s, std::string& out) {
  std::size_t i = 0;
  while (i < s.size()) {
    const int n = utf8_sequence(s, i);
    if (n < 0) break;
    i += static_cast<std::size_t>(n);
  }
  if (i == s.size()) return false;
  out.assign(s.data(), i);
  while (i < s.size()) {
    const int n = utf8_sequence(s, i);
    if (n > 0) {
      out.append(s.data() + i, static_cast<std::size_t>(n));
      i += static_cast<std::size_t>(n);
    } else {
      out.append(kReplacementChar);
      i += static_cast<std::size_t>(-n);
    }
  }
  return true;
}

std::string lossy_utf8(std::string bytes) {
  std::string fixed;
  return make_valid_utf8(bytes, fixed) ? fixed : bytes;
}

// Length of the (valid) UTF-8 character at s[i]; 1 for a stray byte, so that loops always advance.
std::size_t char_len(std::string_view s, std::size_t i) {
  const int n = utf8_sequence(s, i);
  return static_cast<std::size_t>(n > 0 ? n : 1);
}

char32_t decode_char(std::string_view s, std::size_t i, std::size_t len) {
  const auto b = [&](std::size_t k) { return static_cast<char32_t>(static_cast<unsigned char>(s[i + k])); };
  switch (len) {
    case 1: return b(0);
    case 2: return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    case 3: return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    default: return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
  }
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

// Rust's char::is_whitespace (Unicode White_Space), as the regex crate's \s in tokenizers' added-token stripping.
bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  std::size_t pos = 0;
  for (std::size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(s, pos, hit - pos);
    out.append(to);
  }
  if (pos == 0) return;
  out.append(s, pos, std::string::npos);
  s = std::move(out);
}

// ---- GPT-2's byte <-> character map (tokenizers pre_tokenizers/byte_level.rs, bytes_char) ------------------------

struct ByteMap {
  std::array<std::string, 256> byte_to_char;      // UTF-8 of the character standing for each byte
  std::unordered_map<char32_t, unsigned char> char_to_byte;
  ByteMap() {
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const auto c = static_cast<char32_t>(printable ? b : 256 + extra++);
      append_utf8(byte_to_char[static_cast<std::size_t>(b)], c);
      char_to_byte[c] = static_cast<unsigned char>(b);
    }
  }
};

const ByteMap& byte_map() {
  static const ByteMap map;
  return map;
}

// The byte-level characters of a token mapped back to bytes; the token's own bytes when one of its characters is
// not a byte-level character (tokenizers' ByteLevel decoder does the same).
std::string byte_level_to_bytes(const std::string& token) {
  const ByteMap& map = byte_map();
  std::string out;
  for (std::size_t i = 0; i < token.size();) {
    const std::size_t n = char_len(token, i);
    const auto it = map.char_to_byte.find(decode_char(token, i, n));
    if (it == map.char_to_byte.end()) return token;
    out += static_cast<char>(it->second);
    i += n;
  }
  return out;
}

// A <0xXX> byte-fallback token's byte (tokenizers decoders/byte_fallback.rs: 6 bytes, u8::from_str_radix(.., 16)).
bool byte_fallback_value(const std::string& token, unsigned char& value) {
  if (token.size() != 6 || token.compare(0, 3, "<0x") != 0 || token[5] != '>') return false;
  const auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  const int hi = token[3] == '+' ? 0 : hex(token[3]), lo = hex(token[4]);  // Rust accepts a leading '+'
  if (hi < 0 || lo < 0) return false;
  value = static_cast<unsigned char>(hi * 16 + lo);
  return true;
}

// ---- PCRE2 -------------------------------------------------------------------------------------------------------

class Regex {
 public:
  // PCRE2_UTF | PCRE2_UCP: \s, \p{L}, \p{N} as in tokenizers' Oniguruma; PCRE2_MATCH_INVALID_UTF: any bytes are safe.
  Regex(const std::string& pattern, const std::function<void(const std::string&)>& fail) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &offset, nullptr);
    if (code == nullptr) {
      std::array<PCRE2_UCHAR, 256> message{};
      pcre2_get_error_message(error, message.data(), message.size());
      fail("regex " + json(pattern).dump() + " does not compile (PCRE2: " +
           std::string(reinterpret_cast<const char*>(message.data())) + " at offset " + std::to_string(offset) + ")");
    }
    code_.reset(code, pcre2_code_free);
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // when the JIT is unavailable, pcre2_match interprets
  }

  // The non-overlapping matches [begin, end) of the pattern in s, left to right; empty matches are skipped.
  void find_all(std::string_view s, std::vector<std::pair<std::size_t, std::size_t>>& out) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr), pcre2_match_data_free);
    if (!data) throw std::bad_alloc();
    std::size_t pos = 0;
    while (pos < s.size()) {
      const int rc = pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, 0, data.get(),
                                 nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        std::array<PCRE2_UCHAR, 256> message{};
        pcre2_get_error_message(rc, message.data(), message.size());
        throw osengine::ArgumentError("Tokenizer.encode", "text",
                                      "the pre-tokenizer regex failed on this text (PCRE2: " +
                                          std::string(reinterpret_cast<const char*>(message.data())) + ")");
      }
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
      const std::size_t begin = ovector[0], end = ovector[1];
      if (end <= begin) {  // an empty match: go on after the next character
        pos = begin + (begin < s.size() ? char_len(s, begin) : 1);
        continue;
      }
      out.emplace_back(begin, end);
      pos = end;
    }
  }

 private:
  std::shared_ptr<pcre2_code> code_;
};

// The GPT-2 pre-tokenization regex of tokenizers' ByteLevel pre-tokenizer (use_regex = true).
const char* const kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---- splitting (tokenizers normalizer.rs NormalizedString::split) -------------------------------------------------

enum class Behavior { isolated, removed, merged_with_previous, merged_with_next, contiguous };

// A piece of text on its way through pre-tokenization; at_start: it begins at offset 0 of the original text
// (Metaspace's prepend_scheme "first").
struct Piece {
  std::string text;
  bool at_start = false;
};

struct Span {
  std::size_t begin, end;
  bool is_match;
};

// `matches` (sorted, non-overlapping) turned into spans covering all of s, as tokenizers' Pattern::find_matches.
std::vector<Span> spans_of(std::size_t size, const std::vector<std::pair<std::size_t, std::size_t>>& matches,
                           bool invert) {
  std::vector<Span> spans;
  std::size_t prev = 0;
  for (const auto& [b, e] : matches) {
    if (prev < b) spans.push_back({prev, b, invert});
    spans.push_back({b, e, !invert});
    prev = e;
  }
  if (prev < size) spans.push_back({prev, size, invert});
  return spans;
}

void split_piece(const Piece& piece, const std::vector<Span>& spans, Behavior behavior, std::vector<Piece>& out) {
  struct Cut {
    std::size_t begin, end;
    bool remove;
  };
  std::vector<Cut> cuts;
  bool previous_match = false;
  switch (behavior) {
    case Behavior::isolated:
      for (const Span& s : spans) cuts.push_back({s.begin, s.end, false});
      break;
    case Behavior::removed:
      for (const Span& s : spans) cuts.push_back({s.begin, s.end, s.is_match});
      break;
    case Behavior::contiguous:
      for (const Span& s : spans) {
        if (s.is_match == previous_match && !cuts.empty()) cuts.back().end = s.end;
        else cuts.push_back({s.begin, s.end, false});
        previous_match = s.is_match;
      }
      break;
    case Behavior::merged_with_previous:
      for (const Span& s : spans) {
        if (s.is_match && !previous_match && !cuts.empty()) cuts.back().end = s.end;
        else cuts.push_back({s.begin, s.end, false});
        previous_match = s.is_match;
      }
      break;
    case Behavior::merged_with_next:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !cuts.empty()) cuts.back().begin = it->begin;
        else cuts.push_back({it->begin, it->end, false});
        previous_match = it->is_match;
      }
      std::reverse(cuts.begin(), cuts.end());
      break;
  }
  for (const Cut& c : cuts) {
    if (c.remove || c.end <= c.begin) continue;
    out.push_back({piece.text.substr(c.begin, c.end - c.begin), piece.at_start && c.begin == 0});
  }
}

// Spans of single characters for which pred holds (tokenizers' Pattern for Fn(char) -> bool and for char).
template <class Pred>
std::vector<Span> char_spans(const std::string& s, Pred pred) {
  std::vector<std::pair<std::size_t, std::size_t>> matches;
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = char_len(s, i);
    if (pred(decode_char(s, i, n))) matches.emplace_back(i, i + n);
    i += n;
  }
  return spans_of(s.size(), matches, false);
}

// ---- the pipeline's components -------------------------------------------------------------------------------------

struct NormalizerStep {
  enum Kind { prepend, replace } kind;
  std::string a, b;  // prepend: a; replace: a -> b
};

enum class PrependScheme { first, always, never };

struct PreTokenizerStep {
  enum Kind { byte_level, split, metaspace, digits } kind;
  bool add_prefix_space = false, use_regex = true;         // byte_level
  std::shared_ptr<const Regex> regex;                      // byte_level (GPT-2) and split
  Behavior behavior = Behavior::isolated;                  // split
  bool invert = false;                                     // split
  std::string replacement;                                 // metaspace
  char32_t replacement_char = 0;
  PrependScheme prepend_scheme = PrependScheme::always;
  bool metaspace_split = true;
  bool individual_digits = false;                          // digits
};

struct DecoderStep {
  enum Kind { byte_level, metaspace, replace, byte_fallback, fuse, strip } kind;
  std::string a, b;                                        // replace: a -> b; metaspace: a = replacement
  char32_t content = 0;                                    // strip
  std::size_t start = 0, stop = 0;                         // strip
  PrependScheme prepend_scheme = PrependScheme::always;    // metaspace
};

struct AddedToken {
  std::int32_t id = 0;
  std::string content;  // what decode writes (tokenizers' simple_id_to_token: the normalized form when normalized)
  std::string pattern;  // what is matched in the text (the normalized content for normalized tokens)
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
};

// Added tokens matched leftmost-longest (tokenizers' added_vocabulary.rs, MatchKind::LeftmostLongest).
struct AddedMatcher {
  std::array<std::vector<const AddedToken*>, 256> by_first_byte;  // each longest first
  bool empty = true;

  void build(const std::vector<const AddedToken*>& tokens) {
    for (const AddedToken* t : tokens) {
      if (t->pattern.empty()) continue;
      by_first_byte[static_cast<unsigned char>(t->pattern[0])].push_back(t);
      empty = false;
    }
    for (auto& bucket : by_first_byte)
      std::stable_sort(bucket.begin(), bucket.end(), [](const AddedToken* x, const AddedToken* y) {
        return x->pattern.size() > y->pattern.size();
      });
  }
};

struct Segment {
  std::size_t begin, end;
  const AddedToken* token;  // nullptr: text between added tokens
};

struct MergeValue {
  std::int32_t rank, new_id;
};

}  // namespace

namespace detail {

struct TokenizerImpl {
  std::string origin;
  std::int32_t bos = -1;
  // id -> what decode writes (the model's token, or an added token's content); model_tokens: the model's vocabulary
  // by id, which `vocab` (token -> id) points into
  std::vector<std::string> id_to_token;
  std::vector<char> has_token;
  std::vector<std::string> model_tokens;
  std::unordered_map<std::string_view, std::int32_t> vocab;
  std::unordered_map<std::uint64_t, MergeValue> merges;
  std::int32_t unk_id = -1;
  bool byte_fallback = false, fuse_unk = false, ignore_merges = false;
  std::array<std::int32_t, 256> byte_token_ids{};  // <0xXX> ids for byte_fallback, -1 when absent

  std::vector<AddedToken> added;
  std::unordered_map<std::int32_t, std::size_t> added_by_id;
  AddedMatcher raw_matcher, normalized_matcher;
  std::shared_ptr<const Regex> word_char;  // \w for single_word added tokens

  std::vector<NormalizerStep> normalizers;
  std::vector<PreTokenizerStep> pre_tokenizers;
  std::vector<std::int32_t> prefix_ids, suffix_ids;  // TemplateProcessing around a single sequence
  bool has_decoder = false;
  std::vector<DecoderStep> decoders;

  // Word cache: pre-token -> ids, for pre-tokens shorter than 256 bytes (as tokenizers' BPE cache).
  static constexpr std::size_t kCacheCapacity = 1 << 18;
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<std::int32_t>> cache;

  std::string normalize(std::string s) const {
    for (const NormalizerStep& n : normalizers) {
      if (n.kind == NormalizerStep::prepend) {
        if (!s.empty()) s.insert(0, n.a);
      } else {
        replace_all(s, n.a, n.b);
      }
    }
    return s;
  }

  bool is_word_char(std::string_view s, std::size_t i) const {
    std::vector<std::pair<std::size_t, std::size_t>> m;
    word_char->find_all(s.substr(i, char_len(s, i)), m);
    return !m.empty();
  }

  // tokenizers' AddedVocabulary::find_matches.
  std::vector<Segment> split_added(std::string_view s, const AddedMatcher& matcher) const {
    std::vector<Segment> out;
    if (matcher.empty) {
      if (!s.empty()) out.push_back({0, s.size(), nullptr});
      return out;
    }
    std::size_t start_offset = 0;
    for (std::size_t i = 0; i < s.size();) {
      const AddedToken* hit = nullptr;
      for (const AddedToken* t : matcher.by_first_byte[static_cast<unsigned char>(s[i])]) {
        if (s.compare(i, t->pattern.size(), t->pattern) == 0) {
          hit = t;
          break;
        }
      }
      if (hit == nullptr) {
        ++i;
        continue;
      }
      std::size_t start = i, stop = i + hit->pattern.size();
      i = stop;
      if (hit->single_word) {
        std::size_t before = start;  // the character before the match
        while (before > 0 && (static_cast<unsigned char>(s[before - 1]) & 0xC0) == 0x80) --before;
        if (before > 0) --before;
        while (before > 0 && (static_cast<unsigned char>(s[before]) & 0xC0) == 0x80) --before;
        const bool start_space = start == 0 || !is_word_char(s, before);
        const bool stop_space = stop == s.size() || !is_word_char(s, stop);
        if (!start_space || !stop_space) continue;
      }
      if (hit->lstrip) {
        std::size_t new_start = start;
        while (new_start > 0) {
          std::size_t b = new_start - 1;
          while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
          if (!is_white_space(decode_char(s, b, new_start - b))) break;
          new_start = b;
        }
        start = std::max(new_start, start_offset);
      }
      if (hit->rstrip) {
        while (stop < s.size()) {
          const std::size_t n = char_len(s, stop);
          if (!is_white_space(decode_char(s, stop, n))) break;
          stop += n;
        }
      }
      if (start_offset < start) out.push_back({start_offset, start, nullptr});
      out.push_back({start, stop, hit});
      start_offset = stop;
    }
    if (start_offset < s.size()) out.push_back({start_offset, s.size(), nullptr});
    return out;
  }

  std::vector<Piece> pre_tokenize(Piece piece) const {
    std::vector<Piece> pieces;
    pieces.push_back(std::move(piece));
    std::vector<std::pair<std::size_t, std::size_t>> matches;
    for (const PreTokenizerStep& p : pre_tokenizers) {
      std::vector<Piece> next;
      next.reserve(pieces.size());
      for (Piece& cur : pieces) {
        switch (p.kind) {
          case PreTokenizerStep::byte_level: {
            if (p.add_prefix_space && cur.text.compare(0, 1, " ") != 0) cur.text.insert(0, " ");
            const std::size_t first = next.size();
            if (p.use_regex) {
              matches.clear();
              p.regex->find_all(cur.text, matches);
              split_piece(cur, spans_of(cur.text.size(), matches, false), Behavior::isolated, next);
            } else if (!cur.text.empty()) {
              next.push_back(std::move(cur));
            }
            const ByteMap& map = byte_map();
            for (std::size_t k = first; k < next.size(); ++k) {
              std::string mapped;
              mapped.reserve(next[k].text.size() * 2);
              for (char c : next[k].text) mapped += map.byte_to_char[static_cast<unsigned char>(c)];
              next[k].text = std::move(mapped);
            }
            break;
          }
          case PreTokenizerStep::split:
            matches.clear();
            p.regex->find_all(cur.text, matches);
            split_piece(cur, spans_of(cur.text.size(), matches, p.invert), p.behavior, next);
            break;
          case PreTokenizerStep::metaspace: {
            replace_all(cur.text, " ", p.replacement);
            const bool starts = cur.text.compare(0, p.replacement.size(), p.replacement) == 0;
            if (!starts && (p.prepend_scheme == PrependScheme::always ||
                            (p.prepend_scheme == PrependScheme::first && cur.at_start)))
              cur.text.insert(0, p.replacement);
            if (p.metaspace_split) {
              const char32_t r = p.replacement_char;
              split_piece(cur, char_spans(cur.text, [r](char32_t c) { return c == r; }), Behavior::merged_with_next,
                          next);
            } else if (!cur.text.empty()) {
              next.push_back(std::move(cur));
            }
            break;
          }
          case PreTokenizerStep::digits: {
            // Rust's char::is_numeric: general categories Nd, Nl, No (\p{N}).
            const auto spans = char_spans(cur.text, [this](char32_t c) { return is_numeric(c); });
            split_piece(cur, spans, p.individual_digits ? Behavior::isolated : Behavior::contiguous, next);
            break;
          }
        }
      }
      pieces = std::move(next);
    }
    return pieces;
  }

  std::shared_ptr<const Regex> numeric;  // \p{N} for Digits
  bool is_numeric(char32_t c) const {
    if (c < 0x80) return c >= '0' && c <= '9';
    std::string s;
    append_utf8(s, c);
    std::vector<std::pair<std::size_t, std::size_t>> m;
    numeric->find_all(s, m);
    return !m.empty();
  }

  // tokenizers' BPE::merge_word + Word::merge_all.
  void merge_word(const std::string& w, std::vector<std::int32_t>& out) const {
    struct Symbol {
      std::int32_t id;
      std::int64_t prev, next;
      bool removed;
    };
    std::vector<Symbol> symbols;
    symbols.reserve(w.size());
    const auto add = [&](std::int32_t id) {
      const auto n = static_cast<std::int64_t>(symbols.size());
      symbols.push_back({id, n - 1, n + 1, false});
    };
    std::int32_t pending_unk = -1;  // fuse_unk: one unk for a run of unknown characters
    for (std::size_t i = 0; i < w.size();) {
      const std::size_t n = char_len(w, i);
      const auto it = vocab.find(std::string_view(w).substr(i, n));
      i += n;
      if (it != vocab.end()) {
        if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
        add(it->second);
        continue;
      }
      if (byte_fallback) {
        bool all = true;
        for (std::size_t k = i - n; k < i; ++k) all = all && byte_token_ids[static_cast<unsigned char>(w[k])] >= 0;
        if (all) {  // as tokenizers: a pending unk stays pending
          for (std::size_t k = i - n; k < i; ++k) add(byte_token_ids[static_cast<unsigned char>(w[k])]);
          continue;
        }
      }
      if (unk_id >= 0) {
        if (pending_unk >= 0 && !fuse_unk) add(pending_unk);
        pending_unk = unk_id;
      }
      // no unk token: the character is dropped, as tokenizers does
    }
    if (pending_unk >= 0) add(pending_unk);
    if (symbols.empty()) return;
    symbols.back().next = -1;

    struct Merge {
      std::int32_t rank, new_id;
      std::size_t pos;
    };
    const auto later = [](const Merge& x, const Merge& y) {  // min-heap on (rank, pos)
      return x.rank != y.rank ? x.rank > y.rank : x.pos > y.pos;
    };
    const auto key = [](std::int32_t a, std::int32_t b) {
      return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
    };
    std::priority_queue<Merge, std::vector<Merge>, decltype(later)> queue(later);
    for (std::size_t k = 0; k + 1 < symbols.size(); ++k) {
      const auto m = merges.find(key(symbols[k].id, symbols[k + 1].id));
      if (m != merges.end()) queue.push({m->second.rank, m->second.new_id, k});
    }
    while (!queue.empty()) {
      const Merge top = queue.top();
      queue.pop();
      Symbol& cur = symbols[top.pos];
      if (cur.removed || cur.next < 0) continue;
      const auto next_pos = static_cast<std::size_t>(cur.next);
      const Symbol right = symbols[next_pos];
      const auto m = merges.find(key(cur.id, right.id));
      if (m == merges.end() || m->second.new_id != top.new_id) continue;  // an expired entry
      cur.id = top.new_id;
      cur.next = right.next;
      symbols[next_pos].removed = true;
      if (right.next >= 0) symbols[static_cast<std::size_t>(right.next)].prev = static_cast<std::int64_t>(top.pos);
      if (cur.prev >= 0) {
        const auto prev = static_cast<std::size_t>(cur.prev);
        const auto pm = merges.find(key(symbols[prev].id, cur.id));
        if (pm != merges.end()) queue.push({pm->second.rank, pm->second.new_id, prev});
      }
      if (cur.next >= 0) {
        const auto nm = merges.find(key(cur.id, symbols[static_cast<std::size_t>(cur.next)].id));
        if (nm != merges.end()) queue.push({nm->second.rank, nm->second.new_id, top.pos});
      }
    }
    for (const Symbol& s : symbols)
      if (!s.removed) out.push_back(s.id);
  }

  void bpe(const std::string& word, std::vector<std::int32_t>& out) const {
    if (word.empty()) return;
    if (ignore_merges) {
      const auto it = vocab.find(word);
      if (it != vocab.end()) {
        out.push_back(it->second);
        return;
      }
    }
    const bool cacheable = word.size() < 256;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mutex);
      const auto it = cache.find(word);
      if (it != cache.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const std::size_t first = out.size();
    merge_word(word, out);
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mutex);
      if (cache.size() < kCacheCapacity)
        cache.emplace(word, std::vector<std::int32_t>(out.begin() + static_cast<std::ptrdiff_t>(first), out.end()));
    }
  }

  std::vector<std::int32_t> encode(std::string_view input, bool add_special_tokens) const {
    std::string fixed;
    const std::string_view text = make_valid_utf8(input, fixed) ? std::string_view(fixed) : input;
    std::vector<std::int32_t> ids;
    if (add_special_tokens) ids = prefix_ids;
    for (const Segment& raw : split_added(text, raw_matcher)) {
      if (raw.token != nullptr) {
        ids.push_back(raw.token->id);
        continue;
      }
      const std::string normalized = normalize(std::string(text.substr(raw.begin, raw.end - raw.begin)));
      for (const Segment& seg : split_added(normalized, normalized_matcher)) {
        if (seg.token != nullptr) {
          ids.push_back(seg.token->id);
          continue;
        }
        Piece piece{normalized.substr(seg.begin, seg.end - seg.begin), raw.begin == 0 && seg.begin == 0};
        for (const Piece& word : pre_tokenize(std::move(piece))) bpe(word.text, ids);
      }
    }
    if (add_special_tokens) ids.insert(ids.end(), suffix_ids.begin(), suffix_ids.end());
    return ids;
  }

  void check_id(std::int32_t id, const char* op) const {
    if (id < 0 || static_cast<std::size_t>(id) >= id_to_token.size())
      throw osengine::ArgumentError(op, "ids", "token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                                   std::to_string(id_to_token.size()) + ")");
    if (!has_token[static_cast<std::size_t>(id)])
      throw osengine::ArgumentError(op, "ids", "token id " + std::to_string(id) + " has no token in " + origin);
  }

  bool is_special(std::int32_t id) const {
    const auto it = added_by_id.find(id);
    return it != added_by_id.end() && added[it->second].special;
  }

  // tokenizers' Decoder::decode_chain of every step, then join.
  std::string decode(const std::vector<std::int32_t>& ids, bool skip_special_tokens) const {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (std::int32_t id : ids) {
      check_id(id, "Tokenizer.decode");
      if (skip_special_tokens && is_special(id)) continue;
      tokens.push_back(id_to_token[static_cast<std::size_t>(id)]);
    }
    if (!has_decoder) {
      std::string out;
      for (std::size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
      return out;
    }
    for (const DecoderStep& d : decoders) {
      switch (d.kind) {
        case DecoderStep::byte_level: {
          std::string bytes;
          for (const std::string& t : tokens) bytes += byte_level_to_bytes(t);
          tokens.assign(1, lossy_utf8(std::move(bytes)));
          break;
        }
        case DecoderStep::replace:
          for (std::string& t : tokens) replace_all(t, d.a, d.b);
          break;
        case DecoderStep::metaspace:
          for (std::size_t i = 0; i < tokens.size(); ++i)
            replace_all(tokens[i], d.a, i == 0 && d.prepend_scheme != PrependScheme::never ? "" : " ");
          break;
        case DecoderStep::byte_fallback: {
          std::vector<std::string> out;
          std::string bytes;
          std::size_t n_bytes = 0;
          const auto flush = [&] {
            if (n_bytes == 0) return;
            std::string fixed;
            if (!make_valid_utf8(bytes, fixed)) {
              out.push_back(bytes);
            } else {
              for (std::size_t k = 0; k < n_bytes; ++k) out.emplace_back(kReplacementChar);
            }
            bytes.clear();
            n_bytes = 0;
          };
          for (std::string& t : tokens) {
            unsigned char b = 0;
            if (byte_fallback_value(t, b)) {
              bytes += static_cast<char>(b);
              ++n_bytes;
            } else {
              flush();
              out.push_back(std::move(t));
            }
          }
          flush();
          tokens = std::move(out);
          break;
        }
        case DecoderStep::fuse: {
          std::string all;
          for (const std::string& t : tokens) all += t;
          tokens.assign(1, std::move(all));
          break;
        }
        case DecoderStep::strip:
          for (std::string& t : tokens) t = strip(t, d);
          break;
      }
    }
    std::string out;
    for (const std::string& t : tokens) out += t;
    return out;
  }

  static std::string strip(const std::string& t, const DecoderStep& d) {
    std::vector<std::pair<std::size_t, std::size_t>> chars;  // (offset, length)
    for (std::size_t i = 0; i < t.size(); i += chars.back().second) chars.emplace_back(i, char_len(t, i));
    std::size_t start_cut = 0, stop_cut = chars.size();
    for (std::size_t i = 0; i < std::min(d.start, chars.size()); ++i) {
      if (decode_char(t, chars[i].first, chars[i].second) != d.content) break;
      start_cut = i + 1;
    }
    for (std::size_t i = 0; i < std::min(d.stop, chars.size()); ++i) {
      const std::size_t index = chars.size() - i - 1;
      if (decode_char(t, chars[index].first, chars[index].second) != d.content) break;
      stop_cut = index;
    }
    if (stop_cut <= start_cut) return {};
    const std::size_t begin = chars[start_cut].first;
    const std::size_t end = stop_cut < chars.size() ? chars[stop_cut].first : t.size();
    return t.substr(begin, end - begin);
  }

  std::string token_to_piece(std::int32_t id) const {
    check_id(id, "Tokenizer.token_to_piece");
    std::string t = id_to_token[static_cast<std::size_t>(id)];
    for (const DecoderStep& d : decoders) {
      switch (d.kind) {
        case DecoderStep::byte_level: t = byte_level_to_bytes(t); break;
        case DecoderStep::replace: replace_all(t, d.a, d.b); break;
        case DecoderStep::metaspace: replace_all(t, d.a, " "); break;
        case DecoderStep::byte_fallback: {
          unsigned char b = 0;
          if (byte_fallback_value(t, b)) t.assign(1, static_cast<char>(b));
          break;
        }
        case DecoderStep::fuse:
        case DecoderStep::strip: break;  // positional: only the whole sequence's decode applies them
      }
    }
    return t;
  }
};

}  // namespace detail

namespace {

using detail::TokenizerImpl;

// Reading tokenizer.json: every problem is a LoadError naming the file and the field.
class Reader {
 public:
  explicit Reader(std::string origin) : origin_(std::move(origin)) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw LoadError("tokenizer '" + origin_ + "': " + what);
  }

  const json& need(const json& obj, const char* key, const std::string& where) const {
    if (!obj.is_object() || !obj.contains(key)) fail(where + " has no \"" + key + "\"");
    return obj.at(key);
  }
  std::string string_field(const json& obj, const char* key, const std::string& where) const {
    const json& v = need(obj, key, where);
    if (!v.is_string()) fail(where + "." + key + " must be a string, got " + v.dump());
    return v.get<std::string>();
  }
  bool bool_field(const json& obj, const char* key, const std::string& where, bool fallback) const {
    if (!obj.contains(key) || obj.at(key).is_null()) return fallback;
    const json& v = obj.at(key);
    if (!v.is_boolean()) fail(where + "." + key + " must be true or false, got " + v.dump());
    return v.get<bool>();
  }
  std::string type_of(const json& obj, const std::string& where) const {
    if (!obj.is_object()) fail(where + " must be an object, got " + obj.dump().substr(0, 80));
    return string_field(obj, "type", where);
  }
  // A character field (Metaspace's replacement, Strip's content): exactly one UTF-8 character.
  char32_t char_field(const json& obj, const char* key, const std::string& where, std::string* as_string) const {
    const std::string s = string_field(obj, key, where);
    if (s.empty() || char_len(s, 0) != s.size())
      fail(where + "." + key + " must be one character, got " + json(s).dump());
    if (as_string) *as_string = s;
    return decode_char(s, 0, s.size());
  }
  std::string string_pattern(const json& obj, const std::string& where) const {
    const json& p = need(obj, "pattern", where);
    if (p.is_object() && p.contains("String") && p.at("String").is_string()) return p.at("String").get<std::string>();
    fail(where + ".pattern " + p.dump() + " is not supported (only {\"String\": ...} patterns)");
  }
  PrependScheme prepend_scheme(const json& obj, const std::string& where) const {
    // tokenizers' Metaspace: prepend_scheme defaults to "always"; the older add_prefix_space = false means "never".
    PrependScheme scheme = PrependScheme::always;
    const bool declared = obj.contains("prepend_scheme") && !obj.at("prepend_scheme").is_null();
    if (declared) {
      const std::string s = string_field(obj, "prepend_scheme", where);
      if (s == "first") scheme = PrependScheme::first;
      else if (s == "always") scheme = PrependScheme::always;
      else if (s == "never") scheme = PrependScheme::never;
      else fail(where + ".prepend_scheme " + json(s).dump() + " is not one of first, always, never");
    }
    if (!bool_field(obj, "add_prefix_space", where, true)) {
      if (declared && scheme != PrependScheme::never) fail(where + ": add_prefix_space does not match prepend_scheme");
      scheme = PrependScheme::never;
    }
    return scheme;
  }

  std::shared_ptr<const Regex> regex(const std::string& pattern) const {
    return std::make_shared<const Regex>(pattern, [this](const std::string& what) { fail(what); });
  }

  void normalizer(const json& n, TokenizerImpl& t, const std::string& where) const {
    if (n.is_null()) return;
    const std::string type = type_of(n, where);
    if (type == "Sequence") {
      const json& list = need(n, "normalizers", where);
      if (!list.is_array()) fail(where + ".normalizers must be a list");
      for (std::size_t i = 0; i < list.size(); ++i)
        normalizer(list[i], t, where + ".normalizers[" + std::to_string(i) + "]");
    } else if (type == "Prepend") {
      t.normalizers.push_back({NormalizerStep::prepend, string_field(n, "prepend", where), {}});
    } else if (type == "Replace") {
      t.normalizers.push_back({NormalizerStep::replace, string_pattern(n, where), string_field(n, "content", where)});
    } else {
      fail("normalizer \"" + type + "\" (" + where +
           ") is not supported: the runtime supports Sequence, Prepend and Replace (String pattern)" +
           (type.rfind("NF", 0) == 0 ? "; it has no Unicode normalization tables" : ""));
    }
  }

  void pre_tokenizer(const json& p, TokenizerImpl& t, const std::string& where) const {
    if (p.is_null()) return;
    const std::string type = type_of(p, where);
    PreTokenizerStep step{};
    if (type == "Sequence") {
      const json& list = need(p, "pretokenizers", where);
      if (!list.is_array()) fail(where + ".pretokenizers must be a list");
      for (std::size_t i = 0; i < list.size(); ++i)
        pre_tokenizer(list[i], t, where + ".pretokenizers[" + std::to_string(i) + "]");
      return;
    } else if (type == "ByteLevel") {
      step.kind = PreTokenizerStep::byte_level;
      step.add_prefix_space = bool_field(p, "add_prefix_space", where, true);
      step.use_regex = bool_field(p, "use_regex", where, true);
      if (step.use_regex) step.regex = regex(kGpt2Pattern);
    } else if (type == "Split") {
      step.kind = PreTokenizerStep::split;
      const json& pattern = need(p, "pattern", where);
      if (pattern.is_object() && pattern.contains("Regex") && pattern.at("Regex").is_string()) {
        step.regex = regex(pattern.at("Regex").get<std::string>());
      } else if (pattern.is_object() && pattern.contains("String") && pattern.at("String").is_string()) {
        std::string literal = "\\Q" + pattern.at("String").get<std::string>() + "\\E";
        if (pattern.at("String").get<std::string>().find("\\E") != std::string::npos)
          fail(where + ".pattern: a String pattern containing \\E is not supported");
        step.regex = regex(literal);
      } else {
        fail(where + ".pattern must be {\"Regex\": ...} or {\"String\": ...}, got " + pattern.dump());
      }
      const std::string behavior = string_field(p, "behavior", where);
      if (behavior == "Isolated") step.behavior = Behavior::isolated;
      else if (behavior == "Removed") step.behavior = Behavior::removed;
      else if (behavior == "MergedWithPrevious") step.behavior = Behavior::merged_with_previous;
      else if (behavior == "MergedWithNext") step.behavior = Behavior::merged_with_next;
      else if (behavior == "Contiguous") step.behavior = Behavior::contiguous;
      else fail(where + ".behavior " + json(behavior).dump() + " is not a split behavior");
      step.invert = bool_field(p, "invert", where, false);
    } else if (type == "Metaspace") {
      step.kind = PreTokenizerStep::metaspace;
      step.replacement_char = char_field(p, "replacement", where, &step.replacement);
      step.prepend_scheme = prepend_scheme(p, where);
      step.metaspace_split = bool_field(p, "split", where, true);
    } else if (type == "Digits") {
      step.kind = PreTokenizerStep::digits;
      step.individual_digits = bool_field(p, "individual_digits", where, false);
      if (!t.numeric) t.numeric = regex(R"(\p{N})");
    } else {
      fail("pre_tokenizer \"" + type + "\" (" + where +
           ") is not supported: the runtime supports ByteLevel, Split, Metaspace, Digits and Sequence");
    }
    t.pre_tokenizers.push_back(std::move(step));
  }

  void decoder(const json& d, TokenizerImpl& t, const std::string& where) const {
    if (d.is_null()) return;
    t.has_decoder = true;
    const std::string type = type_of(d, where);
    DecoderStep step{};
    if (type == "Sequence") {
      const json& list = need(d, "decoders", where);
      if (!list.is_array()) fail(where + ".decoders must be a list");
      for (std::size_t i = 0; i < list.size(); ++i) decoder(list[i], t, where + ".decoders[" + std::to_string(i) + "]");
      return;
    } else if (type == "ByteLevel") {
      step.kind = DecoderStep::byte_level;
    } else if (type == "Metaspace") {
      step.kind = DecoderStep::metaspace;
      char_field(d, "replacement", where, &step.a);
      step.prepend_scheme = prepend_scheme(d, where);
    } else if (type == "Replace") {
      step.kind = DecoderStep::replace;
      step.a = string_pattern(d, where);
      step.b = string_field(d, "content", where);
    } else if (type == "ByteFallback") {
      step.kind = DecoderStep::byte_fallback;
    } else if (type == "Fuse") {
      step.kind = DecoderStep::fuse;
    } else if (type == "Strip") {
      step.kind = DecoderStep::strip;
      step.content = char_field(d, "content", where, nullptr);
      const json& start = need(d, "start", where);
      const json& stop = need(d, "stop", where);
      if (!start.is_number_unsigned() || !stop.is_number_unsigned()) fail(where + ".start/stop must be counts");
      step.start = start.get<std::size_t>();
      step.stop = stop.get<std::size_t>();
    } else {
      fail("decoder \"" + type + "\" (" + where +
           ") is not supported: the runtime supports ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip and "
           "Sequence");
    }
    t.decoders.push_back(std::move(step));
  }

  std::int32_t special_token_ids(const json& specials, const std::string& name, std::vector<std::int32_t>& out,
                                 const std::string& where) const {
    if (!specials.is_object() || !specials.contains(name))
      fail(where + " names special token " + json(name).dump() + " that special_tokens does not define");
    const json& ids = need(specials.at(name), "ids", where + ".special_tokens[" + json(name).dump() + "]");
    if (!ids.is_array()) fail(where + ".special_tokens[" + json(name).dump() + "].ids must be a list");
    std::int32_t first = -1;
    for (const json& id : ids) {
      if (!id.is_number_integer()) fail(where + ": special token ids must be integers");
      out.push_back(id.get<std::int32_t>());
      if (first < 0) first = out.back();
    }
    return first;
  }

  void post_processor(const json& p, TokenizerImpl& t, std::int32_t& bos, const std::string& where) const {
    if (p.is_null()) return;
    const std::string type = type_of(p, where);
    if (type == "Sequence") {
      const json& list = need(p, "processors", where);
      if (!list.is_array()) fail(where + ".processors must be a list");
      for (std::size_t i = 0; i < list.size(); ++i)
        post_processor(list[i], t, bos, where + ".processors[" + std::to_string(i) + "]");
    } else if (type == "ByteLevel") {
      // offsets only: the ids are unchanged
    } else if (type == "TemplateProcessing") {
      if (!t.prefix_ids.empty() || !t.suffix_ids.empty())
        fail(where + ": a second TemplateProcessing is not supported");
      const json& single = need(p, "single", where);
      if (!single.is_array()) fail(where + ".single must be a list");
      const json specials = p.contains("special_tokens") ? p.at("special_tokens") : json::object();
      bool seen_sequence = false;
      for (const json& item : single) {
        if (item.is_object() && item.contains("Sequence")) {
          const json& seq = item.at("Sequence");
          if (seen_sequence || !seq.is_object() || seq.value("id", "") != "A")
            fail(where + ".single must hold the sequence $A once, got " + single.dump());
          seen_sequence = true;
        } else if (item.is_object() && item.contains("SpecialToken") && item.at("SpecialToken").is_object()) {
          const std::string name = string_field(item.at("SpecialToken"), "id", where + ".single SpecialToken");
          const std::int32_t first = special_token_ids(specials, name, seen_sequence ? t.suffix_ids : t.prefix_ids,
                                                       where);
          if (!seen_sequence && bos < 0) bos = first;
        } else {
          fail(where + ".single item " + item.dump() + " is neither a Sequence nor a SpecialToken");
        }
      }
      if (!seen_sequence) fail(where + ".single does not contain the sequence $A");
    } else {
      fail("post_processor \"" + type + "\" (" + where +
           ") is not supported: the runtime supports TemplateProcessing, ByteLevel and Sequence");
    }
  }

  void model(const json& m, TokenizerImpl& t) const {
    const std::string where = "model";
    if (!m.is_object()) fail("model must be an object");
    const std::string type = m.contains("type") ? string_field(m, "type", where) : "BPE";
    if (type != "BPE")
      fail("model type \"" + type + "\" is not supported: the runtime supports BPE only (not WordPiece, Unigram, "
           "WordLevel)");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (m.contains(key) && !m.at(key).is_null() && !(m.at(key).is_string() && m.at(key).get<std::string>().empty()))
        fail(std::string("model.") + key + " " + m.at(key).dump() + " is not supported (only empty or null)");
    }
    if (m.contains("dropout") && !m.at("dropout").is_null() &&
        !(m.at("dropout").is_number() && m.at("dropout").get<double>() == 0.0))
      fail("model.dropout " + m.at("dropout").dump() + " is not supported (BPE dropout is for training)");
    t.byte_fallback = bool_field(m, "byte_fallback", where, false);
    t.fuse_unk = bool_field(m, "fuse_unk", where, false);
    t.ignore_merges = bool_field(m, "ignore_merges", where, false);

    const json& vocab = need(m, "vocab", where);
    if (!vocab.is_object()) fail("model.vocab must be an object {token: id}");
    std::int64_t max_id = -1;
    for (const auto& [token, id] : vocab.items()) {
      if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() >= (1 << 30))
        fail("model.vocab[" + json(token).dump() + "] must be a non-negative id, got " + id.dump());
      max_id = std::max(max_id, id.get<std::int64_t>());
    }
    t.id_to_token.assign(static_cast<std::size_t>(max_id + 1), std::string());
    t.has_token.assign(t.id_to_token.size(), 0);
    for (const auto& [token, id] : vocab.items()) {
      const auto i = static_cast<std::size_t>(id.get<std::int64_t>());
      if (t.has_token[i]) fail("model.vocab gives id " + std::to_string(i) + " to two tokens");
      t.id_to_token[i] = token;
      t.has_token[i] = 1;
    }
    t.model_tokens = t.id_to_token;
  }

  // After the added tokens have been given their ids (the vocabulary no longer grows): the lookup tables.
  void index_model(const json& m, TokenizerImpl& t) const {
    for (std::size_t i = 0; i < t.model_tokens.size(); ++i)
      if (!t.model_tokens[i].empty()) t.vocab.emplace(t.model_tokens[i], static_cast<std::int32_t>(i));
    t.byte_token_ids.fill(-1);
    for (int b = 0; b < 256; ++b) {
      static const char* const hex = "0123456789ABCDEF";
      const std::string name = std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">";
      const auto it = t.vocab.find(name);
      if (it != t.vocab.end()) t.byte_token_ids[static_cast<std::size_t>(b)] = it->second;
    }
    if (m.contains("unk_token") && !m.at("unk_token").is_null()) {
      const std::string unk = string_field(m, "unk_token", "model");
      const auto it = t.vocab.find(unk);
      if (it == t.vocab.end()) fail("model.unk_token " + json(unk).dump() + " is not in model.vocab");
      t.unk_id = it->second;
    }
    const json& merges = need(m, "merges", "model");
    if (!merges.is_array()) fail("model.merges must be a list");
    const auto lookup = [&](const std::string& token, std::size_t rank) {
      const auto it = t.vocab.find(token);
      if (it == t.vocab.end())
        fail("model.merges[" + std::to_string(rank) + "] uses " + json(token).dump() + ", which is not in the vocab");
      return it->second;
    };
    for (std::size_t rank = 0; rank < merges.size(); ++rank) {
      const json& merge = merges[rank];
      std::string a, b;
      if (merge.is_string()) {  // "a b"
        const std::string s = merge.get<std::string>();
        const std::size_t space = s.find(' ');
        if (space == std::string::npos) fail("model.merges[" + std::to_string(rank) + "] " + merge.dump() +
                                             " is not \"a b\"");
        a = s.substr(0, space), b = s.substr(space + 1);
      } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
        a = merge[0].get<std::string>(), b = merge[1].get<std::string>();
      } else {
        fail("model.merges[" + std::to_string(rank) + "] " + merge.dump() + " is neither \"a b\" nor [\"a\", \"b\"]");
      }
      const std::int32_t ia = lookup(a, rank), ib = lookup(b, rank), merged = lookup(a + b, rank);
      const std::uint64_t key = (static_cast<std::uint64_t>(static_cast<std::uint32_t>(ia)) << 32) |
                                static_cast<std::uint32_t>(ib);
      t.merges[key] = {static_cast<std::int32_t>(rank), merged};  // a repeated pair keeps its last rank, as tokenizers
    }
  }

  void added_tokens(const json& list, TokenizerImpl& t) const {
    if (list.is_null()) return;
    if (!list.is_array()) fail("added_tokens must be a list");
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string where = "added_tokens[" + std::to_string(i) + "]";
      const json& a = list[i];
      AddedToken token;
      const json& id = need(a, "id", where);
      if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() >= (1 << 30))
        fail(where + ".id must be a non-negative id, got " + id.dump());
      token.id = id.get<std::int32_t>();
      token.content = string_field(a, "content", where);
      token.single_word = bool_field(a, "single_word", where, false);
      token.lstrip = bool_field(a, "lstrip", where, false);
      token.rstrip = bool_field(a, "rstrip", where, false);
      token.special = bool_field(a, "special", where, false);
      token.normalized = bool_field(a, "normalized", where, !token.special);
      if (token.content.empty()) continue;  // tokenizers ignores empty added tokens
      token.pattern = token.content;
      if (token.normalized) {  // matched, and decoded, in normalized form (tokenizers' normalized_cache)
        token.pattern = t.normalize(token.content);
        token.content = token.pattern;
      }
      const auto slot = static_cast<std::size_t>(token.id);
      if (slot >= t.id_to_token.size()) {
        t.id_to_token.resize(slot + 1);
        t.has_token.resize(slot + 1, 0);
      }
      t.id_to_token[slot] = token.content;
      t.has_token[slot] = 1;
      if (t.added_by_id.count(token.id)) fail(where + " repeats id " + std::to_string(token.id));
      t.added_by_id[token.id] = t.added.size();
      t.added.push_back(std::move(token));
    }
    std::vector<const AddedToken*> raw, normalized;
    for (const AddedToken& a : t.added) (a.normalized ? normalized : raw).push_back(&a);
    t.raw_matcher.build(raw);
    t.normalized_matcher.build(normalized);
    if (std::any_of(t.added.begin(), t.added.end(), [](const AddedToken& a) { return a.single_word; }))
      t.word_char = regex(R"([\p{L}\p{Nl}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}])");  // Rust regex's \w
  }

  std::shared_ptr<TokenizerImpl> read(const std::string& text) const {
    json root;
    try {
      root = json::parse(text);
    } catch (const json::exception& e) {
      fail(std::string("not valid JSON (") + e.what() + ")");
    }
    if (!root.is_object()) fail("not a tokenizer.json: the top level must be an object");
    auto t = std::make_shared<TokenizerImpl>();
    t->origin = origin_;
    std::int32_t bos = -1;
    try {
      const auto field = [&](const char* key) -> json { return root.contains(key) ? root.at(key) : json(); };
      model(need(root, "model", "tokenizer.json"), *t);
      normalizer(field("normalizer"), *t, "normalizer");
      pre_tokenizer(field("pre_tokenizer"), *t, "pre_tokenizer");
      decoder(field("decoder"), *t, "decoder");
      added_tokens(field("added_tokens"), *t);
      index_model(root.at("model"), *t);
      post_processor(field("post_processor"), *t, bos, "post_processor");
    } catch (const json::exception& e) {
      fail(std::string("unexpected JSON structure (") + e.what() + ")");
    }
    for (std::int32_t id : t->prefix_ids) t->check_id(id, "tokenizer.json post_processor");
    for (std::int32_t id : t->suffix_ids) t->check_id(id, "tokenizer.json post_processor");
    t->bos = bos;
    return t;
  }

 private:
  std::string origin_;
};

}  // namespace

Tokenizer Tokenizer::from_json_string(const std::string& json_text, const std::string& origin) {
  return Tokenizer(Reader(origin).read(json_text));
}

Tokenizer Tokenizer::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw LoadError("tokenizer '" + path + "': cannot open the file (expected a Hugging Face tokenizer.json)");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw LoadError("tokenizer '" + path + "': cannot read the file");
  return from_json_string(text.str(), path);
}

std::vector<std::int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  return impl_->encode(text, add_special_tokens);
}

std::string Tokenizer::decode(const std::vector<std::int32_t>& ids, bool skip_special_tokens) const {
  return impl_->decode(ids, skip_special_tokens);
}

std::string Tokenizer::token_to_piece(std::int32_t id) const { return impl_->token_to_piece(id); }

std::int32_t Tokenizer::vocab_size() const { return static_cast<std::int32_t>(impl_->id_to_token.size()); }

std::int32_t Tokenizer::token_id(std::string_view token) const {
  for (const AddedToken& a : impl_->added)
    if (a.content == token) return a.id;
  const auto it = impl_->vocab.find(token);
  return it == impl_->vocab.end() ? -1 : it->second;
}

std::string Tokenizer::id_to_token(std::int32_t id) const {
  impl_->check_id(id, "Tokenizer.id_to_token");
  return impl_->id_to_token[static_cast<std::size_t>(id)];
}

bool Tokenizer::is_special(std::int32_t id) const { return impl_->is_special(id); }

std::int32_t Tokenizer::bos_token_id() const { return impl_->bos; }

std::size_t Tokenizer::utf8_complete_prefix(std::string_view bytes) {
  const std::size_t n = bytes.size();
  for (std::size_t i = n > 3 ? n - 3 : 0; i < n; ++i) {
    const auto lead = static_cast<unsigned char>(bytes[i]);
    if (lead < 0xC2 || lead > 0xF4) continue;  // ASCII, a continuation byte, or never valid
    const int r = utf8_sequence(bytes, i);
    if (r < 0 && i + static_cast<std::size_t>(-r) == n) return i;  // valid so far, cut short by the end
  }
  return n;
}

}  // namespace osengine::runtime
