// Example 02: generate text from a quantized folder with the native runtime, streamed as the tokens come.
//
//   generate MODEL_DIR [--prompt TEXT] [--max-new-tokens N] [--threads N] [--temperature T] [--seed S]
//
// MODEL_DIR is a folder `osengine quantize --out` wrote, with the model's tokenizer.json. The prompt is tokenized
// (with the tokenizer's special tokens, e.g. a BOS), the continuation is written to stdout as it is generated
// (followed by a newline; the model's end-of-sequence token ends it and is not written), and the speed goes to
// stderr. Greedy by default; --temperature > 0 samples, reproducibly for one --seed.
//
// Streaming: a token's bytes (Tokenizer::token_to_piece) may be part of a multi-byte UTF-8 character, so the bytes
// that do not yet end a character wait for the next token (Tokenizer::utf8_complete_prefix); what is left at the
// end is an incomplete character, written as U+FFFD.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "osengine/runtime/context.hpp"
#include "osengine/runtime/model.hpp"
#include "osengine/runtime/tokenizer.hpp"

namespace {

const char* const kUsage =
    "usage: generate MODEL_DIR [--prompt TEXT] [--max-new-tokens N] [--threads N] [--temperature T] [--seed S]\n";

struct Options {
  std::string model_dir;
  std::string prompt = "Once upon a time";
  int max_new_tokens = 64;
  int threads = 0;  // all cores
  float temperature = 0.0f;
  std::uint64_t seed = 0;
};

// A bad command line: the message names the option and what was expected.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

long long parse_integer(const std::string& option, const std::string& text, long long lo, long long hi) {
  std::size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || value < lo || value > hi)
    throw UsageError(option + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                     "], got '" + text + "'");
  return value;
}

float parse_float(const std::string& option, const std::string& text) {
  std::size_t used = 0;
  float value = 0.0f;
  try {
    value = std::stof(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || !(value >= 0.0f))
    throw UsageError(option + " expects a number >= 0, got '" + text + "'");
  return value;
}

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (arg.rfind("--", 0) != 0) {
      if (!options.model_dir.empty()) throw UsageError("unexpected argument '" + arg + "' (MODEL_DIR is given)");
      options.model_dir = arg;
      continue;
    }
    if (i + 1 >= argc) throw UsageError(arg + " expects a value");
    const std::string value = argv[++i];
    if (arg == "--prompt") {
      options.prompt = value;
    } else if (arg == "--max-new-tokens") {
      options.max_new_tokens = static_cast<int>(parse_integer(arg, value, 0, 1 << 20));
    } else if (arg == "--threads") {
      options.threads = static_cast<int>(parse_integer(arg, value, 0, 1024));
    } else if (arg == "--temperature") {
      options.temperature = parse_float(arg, value);
    } else if (arg == "--seed") {
      options.seed = static_cast<std::uint64_t>(parse_integer(arg, value, 0, (1LL << 62)));
    } else {
      throw UsageError("unknown option '" + arg + "'");
    }
  }
  if (options.model_dir.empty()) throw UsageError("MODEL_DIR is missing");
  return options;
}

double seconds_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

int run(const Options& options) {
  namespace rt = osengine::runtime;
  if (!std::filesystem::is_directory(options.model_dir))
    throw std::runtime_error("model folder '" + options.model_dir + "' does not exist or is not a folder");
  const auto model = rt::Model::load(options.model_dir);
  const auto tokenizer =
      rt::Tokenizer::from_file((std::filesystem::path(options.model_dir) / "tokenizer.json").string());
  const rt::ModelInfo& info = model->info();

  std::vector<std::int32_t> prompt = tokenizer.encode(options.prompt);
  if (prompt.empty() && info.bos_token_id >= 0) prompt.push_back(info.bos_token_id);
  if (prompt.empty()) throw UsageError("--prompt gives no tokens (and the model has no BOS token to start from)");
  const long long n_ctx = static_cast<long long>(prompt.size()) + options.max_new_tokens;
  if (info.n_ctx_train > 0 && n_ctx > info.n_ctx_train)
    throw UsageError("the prompt's " + std::to_string(prompt.size()) + " tokens + --max-new-tokens " +
                     std::to_string(options.max_new_tokens) + " exceed the model's context of " +
                     std::to_string(info.n_ctx_train) + " positions");

  rt::ContextOptions context_options;
  context_options.n_ctx = static_cast<int>(n_ctx);  // the KV cache holds exactly this sequence
  context_options.n_threads = options.threads;
  rt::Context context(model, context_options);
  rt::Sampler::Options sampler_options;
  sampler_options.temperature = options.temperature;
  sampler_options.seed = options.seed;
  rt::Sampler sampler(sampler_options);

  std::string pending;  // bytes that do not end a UTF-8 character yet
  const auto start = std::chrono::steady_clock::now();
  auto first = start;
  int n_new = 0;
  const auto generated = rt::generate(context, prompt, options.max_new_tokens, sampler, [&](std::int32_t token) {
    if (n_new++ == 0) first = std::chrono::steady_clock::now();  // the prompt is decoded: its first token is chosen
    if (token == info.eos_token_id) return false;
    pending += tokenizer.token_to_piece(token);
    const std::size_t complete = rt::Tokenizer::utf8_complete_prefix(pending);
    std::fwrite(pending.data(), 1, complete, stdout);
    std::fflush(stdout);
    pending.erase(0, complete);
    return true;
  });
  const auto end = std::chrono::steady_clock::now();
  if (!pending.empty()) std::fputs("\xEF\xBF\xBD", stdout);  // an incomplete character at the end: U+FFFD
  std::fputs("\n", stdout);
  std::fflush(stdout);

  // The first new token comes with the prompt's forward pass; each other one costs one decode step.
  const double prefill = seconds_between(start, first), decode = seconds_between(first, end);
  const std::size_t n_decoded = generated.empty() ? 0 : generated.size() - 1;
  const auto rate = [](std::size_t n, double seconds) { return seconds > 0 ? static_cast<double>(n) / seconds : 0.0; };
  std::fprintf(stderr, "prompt: %zu tokens in %.3f s (%.1f tokens/s); decode: %zu tokens in %.3f s (%.1f tokens/s)\n",
               prompt.size(), prefill, rate(prompt.size(), prefill), n_decoded, decode, rate(n_decoded, decode));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const UsageError& e) {
    std::fprintf(stderr, "generate: error: %s\n%s", e.what(), kUsage);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "generate: error: %s\n", e.what());
  }
  return 1;
}
