#include "osengine/errors.hpp"

namespace osengine {

ArgumentError::ArgumentError(std::string op, std::string argument, const std::string& what)
    : std::invalid_argument("osengine." + op + ": argument '" + argument + "': " + what),
      op_(std::move(op)),
      argument_(std::move(argument)) {}

}  // namespace osengine
