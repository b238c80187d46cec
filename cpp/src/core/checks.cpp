#include "core/checks.hpp"

#include <cmath>
#include <limits>
#include <sstream>

#include "osengine/backend.hpp"

namespace osengine::detail {

std::string dtype_list(std::initializer_list<DType> dtypes) {
  std::string text;
  std::size_t i = 0;
  for (DType d : dtypes) {
    if (i++) text += (i == dtypes.size() ? " or " : ", ");
    text += dtype_name(d);
  }
  return text;
}

// Without the CUDA backend every operand must be a CPU tensor, whatever the op's data says.
Checker::Checker(const char* op, Device device, int device_index)
    : op_(op), device_(has_cuda_backend() ? device : Device::cpu), device_index_(device_index) {}

void Checker::tensor(const TensorView& t, const std::string& argument, std::initializer_list<DType> dtypes,
                     int ndim) const {
  required(t, argument);
  bool dtype_ok = false;
  for (DType d : dtypes) dtype_ok = dtype_ok || d == t.dtype;
  if (!dtype_ok) fail_type(argument, std::string("expected dtype ") + dtype_list(dtypes) + ", got " + dtype_name(t.dtype));
  if (t.device != device_ || (device_ == Device::cuda && t.device_index != device_index_)) {
    if (!has_cuda_backend()) fail_type(argument, "expected a CPU tensor (the CUDA backend is not built in)");
    if (device_ == Device::cpu)
      fail_type(argument, "expected a CPU tensor like the op's other operands (CPU-packed weights or CPU data), got a "
                          "CUDA tensor");
    fail_type(argument, "expected a CUDA tensor on cuda:" + std::to_string(device_index_) +
                            " like the op's other operands, got a " +
                            (t.device == Device::cpu ? std::string("CPU tensor")
                                                     : "tensor on cuda:" + std::to_string(t.device_index)));
  }
  if (ndim >= 0 && t.ndim() != ndim)
    fail(argument, "expected " + std::to_string(ndim) + " dimensions, got shape " + t.shape_string());
  if (!t.is_contiguous()) fail_type(argument, "must be contiguous (row-major); got strides that are not");
  if (t.numel() > 0 && t.data == nullptr) fail(argument, "has a null data pointer");
}

void Checker::dim_equals(const TensorView& t, const std::string& argument, int dim, std::int64_t expected,
                         const std::string& meaning) const {
  if (t.size(dim) != expected) {
    std::ostringstream msg;
    msg << "dimension " << dim << " must be " << expected << " (" << meaning << "), got shape " << t.shape_string();
    fail(argument, msg.str());
  }
}

void Checker::not_empty(const TensorView& t, const std::string& argument) const {
  if (t.numel() == 0) fail(argument, "is empty (shape " + t.shape_string() + "); every dimension must be >= 1");
}

void Checker::positive_finite(const TensorView& t, const std::string& argument) const {
  if (device_ == Device::cuda) return;
  const float* p = t.ptr<const float>();
  const std::int64_t count = t.numel();
  // Ops check their scales on every call (a decode step checks every weight scale of the model): a branch-free
  // pass the compiler vectorizes first, the search for the bad element only when there is one.
  int bad = 0;
  for (std::int64_t i = 0; i < count; ++i)
    bad |= static_cast<int>(!(p[i] > 0.0f)) | static_cast<int>(!(p[i] <= std::numeric_limits<float>::max()));
  if (bad == 0) return;
  for (std::int64_t i = 0; i < count; ++i) {
    if (!(std::isfinite(p[i]) && p[i] > 0.0f)) {
      std::ostringstream msg;
      msg << "must be positive and finite; found " << p[i] << " at flat index " << i;
      fail(argument, msg.str());
    }
  }
}

void Checker::finite(const TensorView& t, const std::string& argument) const {
  if (device_ == Device::cuda) return;
  const float* p = t.ptr<const float>();
  const std::int64_t count = t.numel();
  int bad = 0;  // branch-free first pass, as in positive_finite
  for (std::int64_t i = 0; i < count; ++i)
    bad |= static_cast<int>(!(std::fabs(p[i]) <= std::numeric_limits<float>::max()));
  if (bad == 0) return;
  for (std::int64_t i = 0; i < count; ++i) {
    if (!std::isfinite(p[i])) {
      std::ostringstream msg;
      msg << "must be finite; found " << p[i] << " at flat index " << i;
      fail(argument, msg.str());
    }
  }
}

void Checker::int_range(const TensorView& t, const std::string& argument, std::int64_t lo, std::int64_t hi) const {
  if (device_ == Device::cuda) return;
  const std::int32_t* p = t.ptr<const std::int32_t>();
  const std::int64_t count = t.numel();
  for (std::int64_t i = 0; i < count; ++i) {
    if (p[i] < lo || p[i] > hi) {
      std::ostringstream msg;
      msg << "values must lie in [" << lo << ", " << hi << "]; found " << p[i] << " at flat index " << i;
      fail(argument, msg.str());
    }
  }
}

void Checker::scale_strides(const TensorView& t, const char* name, std::int64_t rows, const char* rows_meaning,
                            std::int64_t groups, std::int64_t& stride_row, std::int64_t& stride_group) const {
  const std::int64_t count = t.numel();
  if (count == 1) {
    stride_row = stride_group = 0;
  } else if (count == rows && (t.ndim() == 1 || (t.ndim() == 2 && t.size(1) == 1))) {
    stride_row = 1;
    stride_group = 0;
  } else if (groups > 1 && t.ndim() == 2 && t.size(0) == rows && t.size(1) == groups) {
    stride_row = groups;
    stride_group = 1;
  } else {
    std::ostringstream msg;
    msg << "must hold one value, one per " << rows_meaning << " ([" << rows << "])";
    if (groups > 1) msg << " or one per " << rows_meaning << " and group ([" << rows << ", " << groups << "])";
    msg << "; got shape " << t.shape_string();
    if (groups == 1 && t.ndim() == 2 && t.size(0) == rows)
      msg << " (per-group scales need weights packed with that group_size)";
    fail(name, msg.str());
  }
}

}  // namespace osengine::detail
