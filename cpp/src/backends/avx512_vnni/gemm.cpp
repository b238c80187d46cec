// The AVX-512 VNNI backend's GEMM entry: the W4 scheme for int4 weights, the W8 scheme otherwise.
#include "backends/avx512_vnni/avx512_vnni.hpp"

namespace osengine::detail {

void gemm_avx512_vnni(const GemmProblem& p) {
  if (p.weights->bits() == 4) return gemm_w4_avx512_vnni(p);
  gemm_w8_avx512_vnni(p);
}

}  // namespace osengine::detail
