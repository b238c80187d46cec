// The AVX2 backend's GEMM entry: the W4 scheme for int4 weights, the W8 scheme otherwise.
#include "backends/avx2/avx2.hpp"

namespace osengine::detail {

void gemm_avx2(const GemmProblem& p) {
  if (p.weights->bits() == 4) return gemm_w4_avx2(p);
  gemm_w8_avx2(p);
}

}  // namespace osengine::detail
