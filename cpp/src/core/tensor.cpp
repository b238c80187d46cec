#include "osengine/tensor.hpp"

#include <sstream>

namespace osengine {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::int8: return "int8";
    case DType::uint8: return "uint8";
    case DType::int32: return "int32";
    case DType::float32: return "float32";
    case DType::bfloat16: return "bfloat16";
    case DType::float16: return "float16";
  }
  return "unknown";
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::int8:
    case DType::uint8: return 1;
    case DType::bfloat16:
    case DType::float16: return 2;
    case DType::int32:
    case DType::float32: return 4;
  }
  return 0;
}

static std::vector<std::int64_t> contiguous_strides(const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> strides(shape.size());
  std::int64_t step = 1;
  for (std::size_t i = shape.size(); i-- > 0;) {
    strides[i] = step;
    step *= shape[i];
  }
  return strides;
}

TensorView::TensorView(void* data_, DType dtype_, std::vector<std::int64_t> shape_, Device device_)
    : data(data_), dtype(dtype_), device(device_), shape(std::move(shape_)), is_defined(true) {
  strides = contiguous_strides(shape);
}

TensorView::TensorView(void* data_, DType dtype_, std::vector<std::int64_t> shape_,
                       std::vector<std::int64_t> strides_, Device device_)
    : data(data_), dtype(dtype_), device(device_), shape(std::move(shape_)), strides(std::move(strides_)),
      is_defined(true) {}

std::int64_t TensorView::numel() const {
  std::int64_t count = 1;
  for (auto extent : shape) count *= extent;
  return count;
}

std::int64_t TensorView::size(int dim) const {
  if (dim < 0) dim += ndim();
  return shape.at(static_cast<std::size_t>(dim));
}

bool TensorView::is_contiguous() const {
  if (strides.size() != shape.size()) return false;
  if (numel() == 0) return true;  // no element to address (numpy reports zero strides for empty arrays)
  std::int64_t step = 1;
  for (std::size_t i = shape.size(); i-- > 0;) {
    if (shape[i] != 1 && strides[i] != step) return false;
    step *= shape[i];
  }
  return true;
}

std::string TensorView::shape_string() const {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

}  // namespace osengine
