// A strict, memory-mapped reader of the safetensors format:
//   8 bytes   N, the header length (unsigned 64-bit little-endian)
//   N bytes   a JSON object {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//             "__metadata__": {string: string}} (optional metadata)
//   the rest  the tensors' bytes; offsets are relative to the start of this data section.
// Everything is validated before a tensor is handed out: header size (at most 100 MB) and JSON, a known dtype,
// non-negative shapes whose byte size (no overflow) equals end - begin, offsets inside the file, tensors that do
// not overlap. Errors are LoadErrors naming the file and the tensor.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "osengine/tensor.hpp"

namespace osengine::runtime::detail {

// The safetensors dtypes osengine reads, and their element sizes.
enum class StorageType : std::uint8_t { f32, f16, bf16, i8, u8, i32, i64, f64, boolean };
const char* storage_type_name(StorageType type);
// "[3, 4]": a shape as the error messages write it.
std::string shape_text(const std::vector<std::int64_t>& shape);
std::size_t storage_type_size(StorageType type);

struct TensorEntry {
  std::string name;
  StorageType type = StorageType::f32;
  std::vector<std::int64_t> shape;
  std::size_t offset = 0;  // from the start of the file
  std::size_t nbytes = 0;

  std::int64_t numel() const;
  std::string describe() const;  // "F32 [3, 4]"
};

// A read-only memory map of a whole file (shared by the tensors read from it).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

class SafetensorsFile {
 public:
  static constexpr std::size_t kMaxHeaderBytes = 100u << 20;

  // Maps and validates `path`.
  static SafetensorsFile open(const std::string& path);
  // Validates a file already in memory (`bytes` must outlive the result); `label` names it in errors.
  static SafetensorsFile parse(std::shared_ptr<const std::vector<std::uint8_t>> bytes, const std::string& label);

  const std::string& path() const { return label_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<TensorEntry>& tensors() const { return tensors_; }  // in file order
  bool contains(std::string_view name) const;
  // The entry `name`; LoadError when it is missing.
  const TensorEntry& entry(std::string_view name) const;
  // The entry `name` checked to be of `type` and `shape`; LoadError naming what was found otherwise.
  const TensorEntry& expect(std::string_view name, StorageType type, const std::vector<std::int64_t>& shape) const;
  const std::uint8_t* bytes(const TensorEntry& entry) const { return base_ + entry.offset; }
  // A copy of the tensor's elements (safetensors does not promise alignment, so the mapped bytes are not cast).
  template <typename T>
  std::vector<T> read(const TensorEntry& entry) const {
    std::vector<T> values(entry.nbytes / sizeof(T));
    if (entry.nbytes > 0) std::memcpy(values.data(), bytes(entry), entry.nbytes);
    return values;
  }

 private:
  SafetensorsFile(std::shared_ptr<const void> keep_alive, const std::uint8_t* base, std::size_t size,
                  std::string label);
  std::shared_ptr<const void> keep_alive_;
  const std::uint8_t* base_ = nullptr;
  std::size_t size_ = 0;
  std::string label_;
  std::map<std::string, std::string> metadata_;
  std::vector<TensorEntry> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;
};

}  // namespace osengine::runtime::detail
