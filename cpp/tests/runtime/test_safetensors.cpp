// The safetensors reader: well-formed files read back exactly; every malformed header, offset and size is a
// LoadError naming the problem; and random corruptions of a valid file never crash (run under ASan + UBSan in CI).
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "harness.hpp"
#include "osengine/runtime/errors.hpp"
#include "safetensors.hpp"

using osengine::runtime::LoadError;
using osengine::runtime::detail::SafetensorsFile;
using osengine::runtime::detail::StorageType;

namespace {

std::shared_ptr<const std::vector<std::uint8_t>> make_file(const std::string& header,
                                                           const std::vector<std::uint8_t>& data) {
  auto bytes = std::make_shared<std::vector<std::uint8_t>>();
  std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) bytes->push_back(static_cast<std::uint8_t>(n >> (8 * i)));
  bytes->insert(bytes->end(), header.begin(), header.end());
  bytes->insert(bytes->end(), data.begin(), data.end());
  return bytes;
}

std::vector<std::uint8_t> float_bytes(const std::vector<float>& values) {
  std::vector<std::uint8_t> out(values.size() * 4);
  std::memcpy(out.data(), values.data(), out.size());
  return out;
}

// Two tensors: w F32 [2, 3] then codes I8 [4], plus metadata.
const std::string kHeader =
    R"({"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},)"
    R"( "codes": {"dtype": "I8", "shape": [4], "data_offsets": [24, 28]}})";

std::vector<std::uint8_t> valid_data() {
  auto data = float_bytes({1, 2, 3, 4, 5, 6.5f});
  for (int c : {-127, 0, 5, 127}) data.push_back(static_cast<std::uint8_t>(static_cast<std::int8_t>(c)));
  return data;
}

SafetensorsFile parse(const std::string& header, const std::vector<std::uint8_t>& data) {
  return SafetensorsFile::parse(make_file(header, data), "test.safetensors");
}

}  // namespace

TEST(reads_tensors_and_metadata) {
  auto file = parse(kHeader, valid_data());
  CHECK_EQ(file.metadata().at("format"), std::string("pt"));
  CHECK_EQ(file.tensors().size(), std::size_t{2});
  const auto& w = file.expect("w", StorageType::f32, {2, 3});
  const auto w_values = file.read<float>(w);
  CHECK_EQ(w_values[5], 6.5f);
  const auto& codes = file.expect("codes", StorageType::i8, {4});
  auto values = file.read<std::int8_t>(codes);
  CHECK_EQ(int(values[0]), -127);
  CHECK_EQ(int(values[3]), 127);
  CHECK(file.contains("w") && !file.contains("x"));
}

TEST(empty_tensor_and_scalar) {
  auto file = parse(R"({"e": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]},)"
                    R"( "s": {"dtype": "I32", "shape": [], "data_offsets": [0, 4]}})",
                    {1, 0, 0, 0});
  CHECK_EQ(file.entry("e").numel(), std::int64_t{0});
  const auto s_values = file.read<std::int32_t>(file.entry("s"));
  CHECK_EQ(s_values[0], 1);
}

TEST(missing_and_mistyped_tensors) {
  auto file = parse(kHeader, valid_data());
  CHECK_THROWS(file.entry("nope"), LoadError, "tensor 'nope' is missing");
  CHECK_THROWS(file.expect("w", StorageType::f32, {3, 2}), LoadError, "tensor 'w' is F32 [2, 3], expected F32 [3, 2]");
  CHECK_THROWS(file.expect("codes", StorageType::u8, {4}), LoadError, "expected U8 [4]");
}

TEST(malformed_files) {
  const auto data = valid_data();
  CHECK_THROWS(SafetensorsFile::parse(std::make_shared<std::vector<std::uint8_t>>(5, 0), "t"), LoadError,
               "is truncated: 5 bytes");
  {
    auto bytes = make_file(kHeader, data);
    auto cut = std::make_shared<std::vector<std::uint8_t>>(bytes->begin(), bytes->begin() + 40);
    CHECK_THROWS(SafetensorsFile::parse(cut, "t"), LoadError, "is truncated: the header claims");
  }
  {
    auto bytes = make_file(kHeader, data);
    auto cut = std::make_shared<std::vector<std::uint8_t>>(bytes->begin(), bytes->end() - 1);
    CHECK_THROWS(SafetensorsFile::parse(cut, "t"), LoadError, "fall outside the 27 data bytes");
  }
  {
    auto huge = std::make_shared<std::vector<std::uint8_t>>(16, 0xff);
    CHECK_THROWS(SafetensorsFile::parse(huge, "t"), LoadError, "more than the 100 MB limit");
  }
  CHECK_THROWS(parse("{not json", data), LoadError, "the header is not valid JSON");
  CHECK_THROWS(parse("[1, 2]", data), LoadError, "the header is not a JSON object");
  CHECK_THROWS(parse(R"({"w": {"dtype": "F32", "shape": [2, 3]}})", data), LoadError,
               "tensor 'w' needs dtype, shape and data_offsets");
  CHECK_THROWS(parse(R"({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}})", data), LoadError,
               "has dtype \"Q4\", not one of");
  CHECK_THROWS(parse(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", data), LoadError,
               "holds a non-integer or negative");
  CHECK_THROWS(parse(R"({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})", data), LoadError,
               "F32 [2, 3] needs 24 bytes but data_offsets give 20");
  CHECK_THROWS(parse(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", data), LoadError,
               "fall outside");
  CHECK_THROWS(parse(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}})", data),
               LoadError, "overflows the byte count");
  CHECK_THROWS(parse(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},)"
                     R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
                     data),
               LoadError, "tensors 'a' and 'b' overlap");
  CHECK_THROWS(parse(R"({"__metadata__": {"k": 1}})", data), LoadError, "__metadata__['k'] is not a string");
}

TEST(missing_file) {
  CHECK_THROWS(SafetensorsFile::open("/nonexistent/model.safetensors"), LoadError,
               "'/nonexistent/model.safetensors': cannot be opened");
}

// Random byte flips, truncations and header-length changes of a valid file: each parse either succeeds (and every
// tensor it reports lies inside the buffer) or throws LoadError; nothing else may happen.
TEST(random_corruptions_never_crash) {
  const auto original = make_file(kHeader, valid_data());
  std::mt19937 rng(1234);
  int accepted = 0, rejected = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    auto bytes = std::make_shared<std::vector<std::uint8_t>>(*original);
    const int kind = trial % 3;
    if (kind == 0) {
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips; ++f) (*bytes)[rng() % bytes->size()] = static_cast<std::uint8_t>(rng());
    } else if (kind == 1) {
      bytes->resize(rng() % bytes->size());
    } else {
      (*bytes)[rng() % 8] = static_cast<std::uint8_t>(rng());
    }
    try {
      auto file = SafetensorsFile::parse(bytes, "fuzz");
      for (const auto& e : file.tensors()) CHECK(e.offset + e.nbytes <= bytes->size());
      ++accepted;
    } catch (const LoadError&) {
      ++rejected;
    }
  }
  CHECK(accepted > 0 && rejected > 0);
}

OSENGINE_TEST_MAIN
