// Exceptions thrown by osengine. Every message names the op and the offending argument.
#pragma once
#include <stdexcept>
#include <string>

namespace osengine {

// A bad argument value or shape (Python: ValueError).
class ArgumentError : public std::invalid_argument {
 public:
  ArgumentError(std::string op, std::string argument, const std::string& what);
  const std::string& op() const noexcept { return op_; }
  const std::string& argument() const noexcept { return argument_; }

 private:
  std::string op_;
  std::string argument_;
};

// A bad dtype, device or memory layout (Python: TypeError).
class DTypeError : public ArgumentError {
 public:
  using ArgumentError::ArgumentError;
};

// A valid request this build or this machine cannot serve, e.g. backend "avx2" on a CPU without AVX2
// (Python: RuntimeError).
class UnsupportedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace osengine
