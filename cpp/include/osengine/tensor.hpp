// Non-owning tensor views: how buffers cross the osengine API.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace osengine {

enum class DType : std::uint8_t { int8, uint8, int32, float32, bfloat16, float16 };
enum class Device : std::uint8_t { cpu, cuda };

const char* dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);

// A view of memory owned by someone else (a numpy array, a torch tensor, a std::vector).
// Strides are in elements. A default-constructed view is "not given" (defined() == false); optional
// arguments of the ops use that.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::float32;
  Device device = Device::cpu;
  int device_index = 0;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> strides;
  bool is_defined = false;

  TensorView() = default;
  // Contiguous (row-major) view.
  TensorView(void* data, DType dtype, std::vector<std::int64_t> shape, Device device = Device::cpu);
  // Strided view.
  TensorView(void* data, DType dtype, std::vector<std::int64_t> shape, std::vector<std::int64_t> strides,
             Device device = Device::cpu);

  bool defined() const { return is_defined; }
  int ndim() const { return static_cast<int>(shape.size()); }
  std::int64_t numel() const;
  std::int64_t size(int dim) const;  // negative dims count from the end
  bool is_contiguous() const;
  std::string shape_string() const;  // "[3, 17]"

  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

// Brace-friendly helpers for C++ callers: osengine::view(ptr, {m, k}).
inline TensorView view(float* p, std::vector<std::int64_t> shape) { return {p, DType::float32, std::move(shape)}; }
inline TensorView view(const float* p, std::vector<std::int64_t> shape) {
  return {const_cast<float*>(p), DType::float32, std::move(shape)};
}
inline TensorView view(std::int8_t* p, std::vector<std::int64_t> shape) { return {p, DType::int8, std::move(shape)}; }
inline TensorView view(const std::int8_t* p, std::vector<std::int64_t> shape) {
  return {const_cast<std::int8_t*>(p), DType::int8, std::move(shape)};
}
inline TensorView view(std::uint8_t* p, std::vector<std::int64_t> shape) { return {p, DType::uint8, std::move(shape)}; }
inline TensorView view(std::int32_t* p, std::vector<std::int64_t> shape) { return {p, DType::int32, std::move(shape)}; }
inline TensorView view(const std::int32_t* p, std::vector<std::int64_t> shape) {
  return {const_cast<std::int32_t*>(p), DType::int32, std::move(shape)};
}

}  // namespace osengine
