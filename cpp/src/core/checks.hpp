// Argument validation shared by the ops. Each check throws ArgumentError / DTypeError naming the argument.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>

#include "osengine/errors.hpp"
#include "osengine/tensor.hpp"

namespace osengine::detail {

class Checker {
 public:
  explicit Checker(const char* op) : op_(op) {}
  // An op whose tensors must all live on `device` (cuda: on GPU `device_index`). Builds without the CUDA backend
  // check for the CPU whatever is asked, so CUDA tensors get the "not built in" error. The value checks below
  // (positive_finite, finite, int_range) cannot read device memory without a synchronization: they accept CUDA
  // tensors unchecked.
  Checker(const char* op, Device device, int device_index = 0);

  [[noreturn]] void fail(const std::string& argument, const std::string& what) const {
    throw ArgumentError(op_, argument, what);
  }
  [[noreturn]] void fail_type(const std::string& argument, const std::string& what) const {
    throw DTypeError(op_, argument, what);
  }

  // Given, on the op's device (the CPU unless constructed otherwise), contiguous, of one of the dtypes, with `ndim` dimensions (-1: any).
  void tensor(const TensorView& t, const std::string& argument, std::initializer_list<DType> dtypes,
              int ndim = -1) const;
  void required(const TensorView& t, const std::string& argument) const {
    if (!t.defined()) fail(argument, "is required");
  }
  void dim_equals(const TensorView& t, const std::string& argument, int dim, std::int64_t expected,
                  const std::string& meaning) const;
  void not_empty(const TensorView& t, const std::string& argument) const;
  // Every element finite and > 0.
  void positive_finite(const TensorView& t, const std::string& argument) const;
  void finite(const TensorView& t, const std::string& argument) const;
  void int_range(const TensorView& t, const std::string& argument, std::int64_t lo, std::int64_t hi) const;
  // A scale-like tensor: one value, one per row ([rows]) or, with groups > 1, one per row and group ([rows,
  // groups]); its strides (0 where it repeats) or a failure naming `name` and the shapes it accepts.
  void scale_strides(const TensorView& t, const char* name, std::int64_t rows, const char* rows_meaning,
                     std::int64_t groups, std::int64_t& stride_row, std::int64_t& stride_group) const;

  const char* op() const { return op_; }

 private:
  const char* op_;
  Device device_ = Device::cpu;
  int device_index_ = 0;
};

std::string dtype_list(std::initializer_list<DType> dtypes);

}  // namespace osengine::detail
