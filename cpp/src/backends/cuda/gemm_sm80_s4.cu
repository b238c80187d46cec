// W4A4 on sm_80: int4 x int4 tensor cores (mma.sync m16n8k64), int32 accumulators. Both operands are the public
// packed format (two codes per byte, element 2i in the low nibble), which is CUTLASS's int4b_t storage order.
#include "backends/cuda/gemm_sm80_common.cuh"

namespace osengine::detail::cuda {

namespace {
using cutlass::gemm::GemmShape;
using SmallM = sm80::AccumulateGemm<cutlass::int4b_t, GemmShape<64, 64, 128>, GemmShape<32, 32, 128>, GemmShape<16, 8, 64>, 4>;
using LargeM = sm80::AccumulateGemm<cutlass::int4b_t, GemmShape<128, 128, 128>, GemmShape<64, 64, 128>, GemmShape<16, 8, 64>, 3>;
}  // namespace

// lda / ldb in int4 elements (= 2 x bytes per row).
int gemm_sm80_s4(const void* a, std::int64_t lda, const void* w, std::int64_t ldb, std::int32_t* acc, std::int64_t m,
                 std::int64_t n, std::int64_t k, Stream stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (m <= 64) return SmallM::run(a, lda, w, ldb, acc, m, n, k, s);
  return LargeM::run(a, lda, w, ldb, acc, m, n, k, s);
}

}  // namespace osengine::detail::cuda
