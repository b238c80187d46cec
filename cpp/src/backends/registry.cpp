// The backend table: which backends this build contains, registered in one place. The only file that tests a
// backend's build option; a new backend adds its folder (its kernels and backends/<name>/<name>.hpp declaring them),
// its header and one entry here, and its sources in cpp/src/CMakeLists.txt.
#include <string>

#include "backends/avx2/avx2.hpp"
#include "backends/avx512_vnni/avx512_vnni.hpp"
#include "backends/cuda/cuda.hpp"
#include "backends/kernels.hpp"
#include "backends/reference/reference.hpp"
#include "osengine/errors.hpp"

namespace osengine::detail {

namespace {

bool always_available() { return true; }

#ifdef OSENGINE_HAVE_AVX2_KERNELS
bool avx2_available() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
}
#endif

#ifdef OSENGINE_HAVE_AVX512_VNNI_KERNELS
// __builtin_cpu_supports also checks that the OS saves the AVX-512 registers (XCR0).
bool avx512_vnni_available() {
  static const bool has = [] {
    __builtin_cpu_init();
    return avx2_available() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return has;
}
#endif

std::deque<Kernels> builtin_backends() {
  std::deque<Kernels> table;
  Kernels reference;
  reference.name = "reference";
  reference.id = Backend::reference;
  reference.available = always_available;
  reference.quantize = quantize_reference;
  reference.gemm = gemm_reference;
  reference.pack_weights = pack_weights_reference;
  reference.unpack_weights = unpack_weights_reference;
  table.push_back(reference);
#ifdef OSENGINE_HAVE_AVX2_KERNELS
  Kernels avx2;
  avx2.name = "avx2";
  avx2.id = Backend::avx2;
  avx2.available = avx2_available;
  avx2.quantize = quantize_avx2;
  avx2.gemm = gemm_avx2;
  avx2.pack_weights = pack_weights_avx2;
  avx2.arrange_weight_scales = arrange_weight_scales_avx2;
  avx2.unpack_weights = unpack_weights_avx2;
  table.push_back(avx2);
#endif
#ifdef OSENGINE_HAVE_AVX512_VNNI_KERNELS
  // The AVX2 backend's activation quantization and scale arrangement; its own weight layouts and GEMMs.
  Kernels vnni;
  vnni.name = "avx512_vnni";
  vnni.id = Backend::avx512_vnni;
  vnni.available = avx512_vnni_available;
  vnni.quantize = quantize_avx2;
  vnni.gemm = gemm_avx512_vnni;
  vnni.pack_weights = pack_weights_avx512_vnni;
  vnni.arrange_weight_scales = arrange_weight_scales_avx2;
  vnni.unpack_weights = unpack_weights_avx512_vnni;
  table.push_back(vnni);
#endif
#ifdef OSENGINE_HAVE_CUDA
  Kernels cuda;
  cuda.name = "cuda";
  cuda.id = Backend::cuda;
  cuda.device = Device::cuda;
  cuda.available = cuda_device_present;
  cuda.quantize = quantize_cuda;
  cuda.gemm = gemm_cuda;
  cuda.pack_weights = pack_weights_reference;  // the reference layout, uploaded to device memory
  cuda.unpack_weights = unpack_weights_reference;
  cuda.upload = cuda_upload;
  cuda.download = cuda_download;
  cuda.current_device = cuda_current_device;
  table.push_back(cuda);
#endif
  return table;
}

std::deque<Kernels>& table() {
  static std::deque<Kernels> backends = builtin_backends();
  return backends;
}

}  // namespace

void register_backend(const Kernels& kernels) {
  if (kernels.name.empty() || !kernels.available || !kernels.quantize || !kernels.gemm || !kernels.pack_weights ||
      !kernels.unpack_weights)
    throw ArgumentError("register_backend", "kernels", "needs a name and every kernel (available, quantize, gemm, "
                                                       "pack_weights, unpack_weights)");
  for (Kernels& entry : table()) {
    if (entry.name == kernels.name) {
      entry = kernels;
      return;
    }
  }
  table().push_back(kernels);
}

const std::deque<Kernels>& registered_kernels() { return table(); }

const Kernels* find_kernels(const std::string& name) {
  for (const Kernels& entry : table())
    if (entry.name == name) return &entry;
  return nullptr;
}

const Kernels& kernels_for(Backend backend, const char* op) {
  const Kernels* kernels = find_kernels(backend_name(backend));
  if (kernels == nullptr)
    throw UnsupportedError(std::string("osengine.") + op + ": backend '" + backend_name(backend) +
                           "' is not built into this osengine");
  return *kernels;
}

const Kernels& resolve_cpu_kernels(const std::string& name, const char* op) {
  for (Backend builtin : {Backend::automatic, Backend::reference, Backend::avx2, Backend::avx512_vnni, Backend::cuda})
    if (name == backend_name(builtin)) return kernels_for(resolve_cpu_backend(builtin, op), op);
  const Kernels* kernels = find_kernels(name);
  if (kernels == nullptr) {
    std::string names;
    for (const Kernels& entry : table()) names += (names.empty() ? "" : ", ") + entry.name;
    throw ArgumentError(op, "backend", "unknown backend '" + name + "'; expected 'auto' or a registered backend (" +
                                           names + ")");
  }
  if (kernels->device != Device::cpu || !kernels->available())
    throw UnsupportedError(std::string("osengine.") + op + ": backend '" + name + "' cannot run on CPU data here");
  return *kernels;
}

}  // namespace osengine::detail
