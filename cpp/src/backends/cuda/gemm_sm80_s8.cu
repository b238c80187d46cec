// W8A8 on sm_80: int8 x int8 tensor cores (mma.sync m16n8k32), int32 accumulators.
// Tile configurations by M bucket: a narrow tile for decode / small batches (more CTAs along N), the CUTLASS
// 128x128x64 workhorse for prefill. Not yet measured on a GPU: see benchmarks/gemm.py --device cuda.
#include "backends/cuda/gemm_sm80_common.cuh"

namespace osengine::detail::cuda {

namespace {
using cutlass::gemm::GemmShape;
// M <= 64: 64 x 64 tiles (4 warps of 32 x 32), deep pipeline to hide the weight stream.
using SmallM = sm80::AccumulateGemm<std::int8_t, GemmShape<64, 64, 64>, GemmShape<32, 32, 64>, GemmShape<16, 8, 32>, 6>;
// M > 64: 128 x 128 tiles (4 warps of 64 x 64).
using LargeM = sm80::AccumulateGemm<std::int8_t, GemmShape<128, 128, 64>, GemmShape<64, 64, 64>, GemmShape<16, 8, 32>, 3>;
}  // namespace

int gemm_sm80_s8(const std::int8_t* a, std::int64_t lda, const std::int8_t* w, std::int64_t ldb, std::int32_t* acc,
                 std::int64_t m, std::int64_t n, std::int64_t k, Stream stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (m <= 64) return SmallM::run(a, lda, w, ldb, acc, m, n, k, s);
  return LargeM::run(a, lda, w, ldb, acc, m, n, k, s);
}

}  // namespace osengine::detail::cuda
