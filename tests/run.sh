#!/usr/bin/env bash
# The whole test suite, as CI runs it (README: "Run the tests"):
#   1. install the package (C++ engine + osengine._C + front end + built-in plugins), warnings as errors;
#   2. C++ unit tests (the engine and the native runtime) through ctest, then again under AddressSanitizer +
#      UndefinedBehaviorSanitizer;
#   3. install the C++ engine and build + run cpp/examples/01_quantize_and_gemm through find_package(osengine); build
#      the generation examples 02_generate (C++) and 03_c_generate (C API) the same way, for step 4 to run;
#   4. the linter (ruff, configured in pyproject.toml) and the Python tests (tests/runtime/test_examples.py runs the
#      generation examples on a tiny quantized folder, found through OSENGINE_EXAMPLE_BIN_DIR).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${OSENGINE_TEST_DIR:-$root/build/test-run}
jobs=$(nproc)
mkdir -p "$work"
step() { printf '\n==== %s ====\n' "$*"; }

step "install osengine (warnings are errors)"
# torch: the CPU build (a plain 'torch' requirement could pull a multi-GB CUDA build); kept if already present.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# CUDA backend: with nvcc on the machine, the CUTLASS headers come from PyPI (headers only: --no-deps). The CUDA
# kernels are compiled once per run: in the ctest Release build below (sm_80 + sm_90a), and also in the package only
# when a GPU is present, so that the Python CUDA tests (tests/engine/test_ops_cuda.py) have something to run.
cuda_define=()
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  python -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)" 2>/dev/null ||
    python -m pip install -q --no-deps nvidia-cutlass
  if ! nvidia-smi -L >/dev/null 2>&1; then
    cuda_define=(--config-settings=cmake.define.OSENGINE_CUDA=OFF)
  fi
fi
# The native runtime needs the header-only nlohmann/json: the package build gets it as a build requirement; the C++
# test builds below find it through this install (or a system copy), and are configured with OSENGINE_RUNTIME=ON so
# that a runtime that does not build (or misses a dependency) fails the run.
python -m pip install -q "nlohmann-json>=3.10"
# The runtime's tokenizer needs PCRE2 through pkg-config (no PyPI package has the headers): from the system packages.
if { [ ! -f /usr/include/pcre2.h ] || [ ! -f /usr/include/nlohmann/json.hpp ] || ! command -v pkg-config >/dev/null; } &&
   command -v apt-get >/dev/null 2>&1; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  ${sudo[@]+"${sudo[@]}"} apt-get update -qq
  DEBIAN_FRONTEND=noninteractive ${sudo[@]+"${sudo[@]}"} apt-get install -y -qq nlohmann-json3-dev libpcre2-dev \
    pkg-config >/dev/null
fi
python -m pip install -q "$root[frontend,test]" --config-settings=cmake.define.OSENGINE_WERROR=ON \
  --config-settings=cmake.define.OSENGINE_RUNTIME=ON ${cuda_define[@]+"${cuda_define[@]}"}

step "C++ tests (Release, -Werror; with nvcc also compiles the CUDA backend, OSENGINE_CUDA=AUTO)"
cmake -S "$root" -B "$work/release" -G Ninja -DCMAKE_BUILD_TYPE=Release -DOSENGINE_BUILD_TESTS=ON \
  -DOSENGINE_WERROR=ON -DOSENGINE_RUNTIME=ON -DCMAKE_INSTALL_PREFIX="$work/prefix" >/dev/null
cmake --build "$work/release" -j "$jobs"
ctest --test-dir "$work/release" --output-on-failure -j "$jobs"

step "C++ tests under ASan + UBSan"
cmake -S "$root" -B "$work/asan" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DOSENGINE_BUILD_TESTS=ON \
  -DOSENGINE_WERROR=ON -DOSENGINE_SANITIZE=ON -DOSENGINE_CUDA=OFF -DOSENGINE_RUNTIME=ON >/dev/null
cmake --build "$work/asan" -j "$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir "$work/asan" --output-on-failure -j "$jobs"

step "C++ examples linked through find_package(osengine)"
cmake --install "$work/release" >/dev/null
cmake -S "$root/cpp/examples/01_quantize_and_gemm" -B "$work/example" -G Ninja \
  -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/example"
"$work/example/quantize_and_gemm"
# The generation examples need a quantized folder and its tokenizer: tests/runtime/test_examples.py (below) makes a
# tiny one, runs both from OSENGINE_EXAMPLE_BIN_DIR and compares their text with the Python runtime's.
rm -rf "$work/examples-bin"
for example in 02_generate 03_c_generate; do
  cmake -S "$root/cpp/examples/$example" -B "$work/example-$example" -G Ninja -DCMAKE_PREFIX_PATH="$work/prefix" \
    -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$work/examples-bin" >/dev/null
  cmake --build "$work/example-$example"
done
export OSENGINE_EXAMPLE_BIN_DIR="$work/examples-bin"

step "Lint (ruff)"
cd "$root"
python -m ruff check .

step "Python tests"
python -m pytest -q tests
