#include "safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "osengine/runtime/errors.hpp"

namespace osengine::runtime::detail {
namespace {

struct TypeInfo {
  const char* name;
  StorageType type;
  std::size_t size;
};
constexpr TypeInfo kTypes[] = {
    {"F32", StorageType::f32, 4}, {"F16", StorageType::f16, 2}, {"BF16", StorageType::bf16, 2},
    {"I8", StorageType::i8, 1},   {"U8", StorageType::u8, 1},   {"I32", StorageType::i32, 4},
    {"I64", StorageType::i64, 8}, {"F64", StorageType::f64, 8}, {"BOOL", StorageType::boolean, 1},
};

[[noreturn]] void fail(const std::string& label, const std::string& what) {
  throw LoadError("safetensors file '" + label + "': " + what);
}

}  // namespace

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

const char* storage_type_name(StorageType type) {
  for (const auto& t : kTypes)
    if (t.type == type) return t.name;
  return "?";
}

std::size_t storage_type_size(StorageType type) {
  for (const auto& t : kTypes)
    if (t.type == type) return t.size;
  return 0;
}

std::int64_t TensorEntry::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::string TensorEntry::describe() const { return std::string(storage_type_name(type)) + " " + shape_text(shape); }

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, std::string("cannot be opened (") + std::strerror(errno) + ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "is not a regular file");
  }
  size_ = static_cast<std::size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      fail(path, std::string("cannot be memory-mapped (") + std::strerror(errno) + ")");
    }
    data_ = static_cast<const std::uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<std::uint8_t*>(data_), size_);
}

SafetensorsFile::SafetensorsFile(std::shared_ptr<const void> keep_alive, const std::uint8_t* base, std::size_t size,
                                 std::string label)
    : keep_alive_(std::move(keep_alive)), base_(base), size_(size), label_(std::move(label)) {
  if (size_ < 8) fail(label_, "is truncated: " + std::to_string(size_) + " bytes, less than the 8-byte header length");
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base_[i];
  if (header_len > kMaxHeaderBytes)
    fail(label_, "the header claims " + std::to_string(header_len) + " bytes, more than the 100 MB limit (corrupt?)");
  if (header_len > size_ - 8)
    fail(label_, "is truncated: the header claims " + std::to_string(header_len) + " bytes but only " +
                     std::to_string(size_ - 8) + " follow");
  const std::size_t data_start = 8 + static_cast<std::size_t>(header_len);
  const std::size_t data_size = size_ - data_start;

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(reinterpret_cast<const char*>(base_ + 8),
                                   reinterpret_cast<const char*>(base_ + data_start));
  } catch (const nlohmann::json::exception& e) {
    fail(label_, std::string("the header is not valid JSON (") + e.what() + ")");
  }
  if (!header.is_object()) fail(label_, "the header is not a JSON object");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& value = it.value();
    if (name == "__metadata__") {
      if (!value.is_object()) fail(label_, "__metadata__ is not an object of strings");
      for (auto m = value.begin(); m != value.end(); ++m) {
        if (!m.value().is_string()) fail(label_, "__metadata__['" + m.key() + "'] is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!value.is_object() || !value.contains("dtype") || !value.contains("shape") || !value.contains("data_offsets"))
      fail(label_, where + " needs dtype, shape and data_offsets");
    TensorEntry entry;
    entry.name = name;
    const auto& dtype = value["dtype"];
    bool known = false;
    if (dtype.is_string()) {
      for (const auto& t : kTypes) {
        if (dtype.get<std::string>() == t.name) {
          entry.type = t.type;
          known = true;
        }
      }
    }
    if (!known) fail(label_, where + " has dtype " + dtype.dump() + ", not one of F32 F16 BF16 I8 U8 I32 I64 F64 BOOL");
    const auto& shape = value["shape"];
    if (!shape.is_array()) fail(label_, where + ": shape is not an array");
    // Byte size with overflow checks: every factor is bounded by the file size.
    std::size_t nbytes = storage_type_size(entry.type);
    for (const auto& d : shape) {
      if (!d.is_number_unsigned()) fail(label_, where + ": shape " + shape.dump() + " holds a non-integer or negative");
      const auto dim = d.get<std::uint64_t>();
      if (dim > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail(label_, where + ": shape " + shape.dump() + " is too large");
      entry.shape.push_back(static_cast<std::int64_t>(dim));
      if (dim != 0 && nbytes > std::numeric_limits<std::size_t>::max() / dim)
        fail(label_, where + ": shape " + shape.dump() + " overflows the byte count");
      nbytes *= static_cast<std::size_t>(dim);
    }
    const auto& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned())
      fail(label_, where + ": data_offsets must be two non-negative integers [begin, end]");
    const auto begin = offsets[0].get<std::uint64_t>(), end = offsets[1].get<std::uint64_t>();
    if (begin > end || end > data_size)
      fail(label_, where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                       "] fall outside the " + std::to_string(data_size) + " data bytes (truncated file?)");
    if (end - begin != nbytes)
      fail(label_, where + ": " + entry.describe() + " needs " + std::to_string(nbytes) + " bytes but data_offsets give " +
                       std::to_string(end - begin));
    entry.offset = data_start + static_cast<std::size_t>(begin);
    entry.nbytes = nbytes;
    tensors_.push_back(std::move(entry));
  }
  std::sort(tensors_.begin(), tensors_.end(),
            [](const TensorEntry& a, const TensorEntry& b) { return a.offset < b.offset; });
  for (std::size_t i = 0; i < tensors_.size(); ++i) {
    if (i > 0 && tensors_[i].offset < tensors_[i - 1].offset + tensors_[i - 1].nbytes)
      fail(label_, "tensors '" + tensors_[i - 1].name + "' and '" + tensors_[i].name + "' overlap");
    index_.emplace(tensors_[i].name, i);
  }
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  auto mapped = std::make_shared<MappedFile>(path);
  const std::uint8_t* data = mapped->data();
  const std::size_t size = mapped->size();
  return SafetensorsFile(std::move(mapped), data, size, path);
}

SafetensorsFile SafetensorsFile::parse(std::shared_ptr<const std::vector<std::uint8_t>> bytes,
                                       const std::string& label) {
  const std::uint8_t* data = bytes->data();
  const std::size_t size = bytes->size();
  return SafetensorsFile(std::move(bytes), data, size, label);
}

bool SafetensorsFile::contains(std::string_view name) const { return index_.find(name) != index_.end(); }

const TensorEntry& SafetensorsFile::entry(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) fail(label_, "tensor '" + std::string(name) + "' is missing");
  return tensors_[it->second];
}

const TensorEntry& SafetensorsFile::expect(std::string_view name, StorageType type,
                                           const std::vector<std::int64_t>& shape) const {
  const TensorEntry& e = entry(name);
  if (e.type != type || e.shape != shape)
    fail(label_, "tensor '" + e.name + "' is " + e.describe() + ", expected " + storage_type_name(type) + " " +
                     shape_text(shape));
  return e;
}

}  // namespace osengine::runtime::detail
