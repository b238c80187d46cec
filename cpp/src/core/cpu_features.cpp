#include <cstdlib>
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
    case Backend::avx512_vnni: return "avx512_vnni";
    case Backend::cuda: return "cuda";
  }
  return "unknown";
}

Backend parse_backend(const std::string& name) {
  if (name == "auto") return Backend::automatic;
  if (name == "reference") return Backend::reference;
  if (name == "avx2") return Backend::avx2;
  if (name == "avx512_vnni") return Backend::avx512_vnni;
  if (name == "cuda") return Backend::cuda;
  throw ArgumentError("parse_backend", "backend",
                      "unknown backend '" + name + "'; expected 'auto', 'reference', 'avx2', 'avx512_vnni' or 'cuda'");
}

bool cpu_has_avx2() {
  const detail::Kernels* avx2 = detail::find_kernels("avx2");
  return avx2 != nullptr && avx2->available();
}

bool cpu_has_avx512_vnni() {
  const detail::Kernels* vnni = detail::find_kernels("avx512_vnni");
  return vnni != nullptr && vnni->available();
}

bool has_cuda_backend() { return detail::find_kernels("cuda") != nullptr; }

std::vector<std::string> registered_backends() {
  std::vector<std::string> names;
  for (const detail::Kernels& kernels : detail::registered_kernels())
    if (kernels.available()) names.push_back(kernels.name);
  return names;
}

Backend best_cpu_backend() {
  // OSENGINE_CPU_BACKEND chooses for `automatic` (e.g. avx2 on an AVX-512 machine, to compare the two); unset, empty
  // or "auto": the fastest one here.
  const char* forced = std::getenv("OSENGINE_CPU_BACKEND");
  if (forced != nullptr && *forced != '\0' && std::string(forced) != "auto") {
    const std::string name(forced);
    for (Backend backend : {Backend::reference, Backend::avx2, Backend::avx512_vnni})
      if (name == backend_name(backend)) return resolve_cpu_backend(backend, "OSENGINE_CPU_BACKEND");
    throw ArgumentError("best_cpu_backend", "OSENGINE_CPU_BACKEND",
                        "environment variable is '" + name +
                            "'; expected 'auto', 'reference', 'avx2' or 'avx512_vnni' (a CPU backend)");
  }
  if (cpu_has_avx512_vnni()) return Backend::avx512_vnni;
  return cpu_has_avx2() ? Backend::avx2 : Backend::reference;
}

Backend resolve_cpu_backend(Backend requested, const char* op) {
  switch (requested) {
    case Backend::automatic: return best_cpu_backend();
    case Backend::reference: return Backend::reference;
    case Backend::avx2:
      if (!cpu_has_avx2())
        throw UnsupportedError(std::string("osengine.") + op +
                               ": backend 'avx2' needs a CPU with AVX2 and FMA and a build with the AVX2 kernels");
      return Backend::avx2;
    case Backend::avx512_vnni:
      if (!cpu_has_avx512_vnni())
        throw UnsupportedError(std::string("osengine.") + op +
                               ": backend 'avx512_vnni' needs a CPU with AVX-512 (F, BW, VL) and VNNI and a build with "
                               "its kernels");
      return Backend::avx512_vnni;
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
