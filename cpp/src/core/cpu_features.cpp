#include <string>
#include <vector>

#include "backends/kernels.hpp"
#include "osengine/backend.hpp"
#include "osengine/errors.hpp"

namespace osengine {

const char* backend_name(Backend backend) {
  switch (backend) {
    case Backend::automatic: return "auto";
    case Backend::reference: return "reference";
    case Backend::avx2: return "avx2";
    case Backend::cuda: return "cuda";
  }
  return "unknown";
}

Backend parse_backend(const std::string& name) {
  if (name == "auto") return Backend::automatic;
  if (name == "reference") return Backend::reference;
  if (name == "avx2") return Backend::avx2;
  if (name == "cuda") return Backend::cuda;
  throw ArgumentError("parse_backend", "backend",
                      "unknown backend '" + name + "'; expected 'auto', 'reference', 'avx2' or 'cuda'");
}

bool cpu_has_avx2() {
  const detail::Kernels* avx2 = detail::find_kernels("avx2");
  return avx2 != nullptr && avx2->available();
}

bool has_cuda_backend() { return detail::find_kernels("cuda") != nullptr; }

std::vector<std::string> registered_backends() {
  std::vector<std::string> names;
  for (const detail::Kernels& kernels : detail::registered_kernels())
    if (kernels.available()) names.push_back(kernels.name);
  return names;
}

Backend best_cpu_backend() { return cpu_has_avx2() ? Backend::avx2 : Backend::reference; }

Backend resolve_cpu_backend(Backend requested, const char* op) {
  switch (requested) {
    case Backend::automatic: return best_cpu_backend();
    case Backend::reference: return Backend::reference;
    case Backend::avx2:
      if (!cpu_has_avx2())
        throw UnsupportedError(std::string("osengine.") + op +
                               ": backend 'avx2' needs a CPU with AVX2 and FMA and a build with the AVX2 kernels");
      return Backend::avx2;
    case Backend::cuda:
      if (has_cuda_backend())
        throw UnsupportedError(std::string("osengine.") + op +
                               ": backend 'cuda' is not built for CPU data; pass CUDA tensors (or pack the weights "
                               "with backend 'cuda') to run on the GPU");
      throw UnsupportedError(std::string("osengine.") + op + ": backend 'cuda' is not built into this osengine");
  }
  return Backend::reference;
}

}  // namespace osengine
