// Errors of the native runtime. Every message names the file (or folder) and what was expected.
#pragma once
#include <stdexcept>
#include <string>

namespace osengine::runtime {

// A model folder or file that cannot be loaded: missing, truncated, corrupt, inconsistent, a newer format version,
// or an architecture / quantization scheme this runtime does not run (Python: osengine.io.checkpoint.CheckpointError
// is the front end's counterpart).
class LoadError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace osengine::runtime
