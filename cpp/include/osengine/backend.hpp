// Backends and runtime CPU dispatch.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace osengine {

// automatic: the fastest backend this machine supports for the data's device.
// reference: scalar C++, the oracle every optimized kernel is tested against.
// avx2:      x86-64 AVX2 + FMA kernels (runtime-checked; UnsupportedError where the CPU lacks them).
// avx512_vnni: x86-64 AVX-512 VNNI integer products (vpdpbusd) on the AVX2 backend's design (runtime-checked).
// cuda:      NVIDIA GPUs (its own build option).
enum class Backend { automatic, reference, avx2, cuda, avx512_vnni };

const char* backend_name(Backend backend);

// A backend choice: a built-in Backend, or any registered backend by name ("auto", "reference", "avx2", "cuda", or a
// name registered at run time; see registered_backends()).
class BackendChoice {
 public:
  BackendChoice(Backend backend = Backend::automatic) : name_(backend_name(backend)) {}  // NOLINT: implicit on purpose
  BackendChoice(std::string name) : name_(std::move(name)) {}                            // NOLINT
  BackendChoice(const char* name) : name_(name) {}                                       // NOLINT
  const std::string& name() const { return name_; }

 private:
  std::string name_;
};
Backend parse_backend(const std::string& name);  // "auto", "reference", "avx2", "avx512_vnni", "cuda"

// Whether the running CPU has AVX2 + FMA and this build contains the AVX2 kernels.
bool cpu_has_avx2();
// Whether the running CPU has AVX-512 F/BW/VL + VNNI (and AVX2) and this build contains the AVX-512 VNNI kernels.
bool cpu_has_avx512_vnni();
// The backend `automatic` resolves to for CPU data: the fastest here, or the one the environment variable
// OSENGINE_CPU_BACKEND names ("reference", "avx2", "avx512_vnni"; UnsupportedError when it cannot run here,
// ArgumentError for another name).
Backend best_cpu_backend();
// Resolve `automatic`; throw UnsupportedError for a backend that cannot run here.
Backend resolve_cpu_backend(Backend requested, const char* op);

// Whether this build contains the CUDA backend (OSENGINE_CUDA). Whether a GPU is present is the caller's question.
bool has_cuda_backend();

// The names of the backends this build registers and this machine can run ("reference" first; "avx2" with AVX2 +
// FMA; "avx512_vnni" with AVX-512 VNNI; "cuda" with a GPU; and any variant registered at run time).
std::vector<std::string> registered_backends();

// Threads used by the CPU kernels (OpenMP). 0 restores the default (all cores).
void set_num_threads(int num_threads);
int get_num_threads();

// Sets the number of threads of the CPU kernels for the calling thread only, while it lives (0: keep what
// get_num_threads() says): callers that each run their own work (e.g. runtime contexts on several threads) then do
// not change one another's setting.
class ThreadCountScope {
 public:
  explicit ThreadCountScope(int num_threads);
  ~ThreadCountScope();
  ThreadCountScope(const ThreadCountScope&) = delete;
  ThreadCountScope& operator=(const ThreadCountScope&) = delete;

 private:
  int previous_;
};

}  // namespace osengine
