// W4A8 on sm_80: int8 activations x int4 weights. The weights stream from memory as int4 (half the bytes of W8A8)
// and are upcast to int8 in registers (CUTLASS mixed-input warp MMA, OpMultiplyAddMixedInputUpcast) before the int8
// tensor-core MMA; scales stay in the epilogue. Also the W4A8 kernel on sm_90 (PTX for compute_80, JIT-compiled; its
// int8 mma.sync is native there): Hopper has no int4 MMA, so int4 weights buy memory bandwidth, not math.
#include <cuda_runtime.h>

#include "backends/cuda/cuda_kernels.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_universal.h"
#include "cutlass/numeric_types.h"

namespace osengine::detail::cuda {

namespace {

using cutlass::gemm::GemmShape;

template <typename TileShape, typename WarpShape, int Stages>
struct MixedGemm {
  using Output = cutlass::epilogue::thread::LinearCombination<std::int32_t, 4, std::int32_t, std::int32_t,
                                                              cutlass::epilogue::thread::ScaleType::Nothing>;
  using Gemm = cutlass::gemm::device::GemmUniversal<
      std::int8_t, cutlass::layout::RowMajor, cutlass::int4b_t, cutlass::layout::ColumnMajor, std::int32_t,
      cutlass::layout::RowMajor, std::int32_t, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape,
      WarpShape, GemmShape<16, 8, 32>, Output, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Stages,
      16, 32, cutlass::arch::OpMultiplyAddMixedInputUpcast>;

  static int run(const std::int8_t* a, std::int64_t lda, const void* w, std::int64_t ldb, std::int32_t* acc,
                 std::int64_t m, std::int64_t n, std::int64_t k, cudaStream_t stream) {
    typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm,
                                  {static_cast<int>(m), static_cast<int>(n), static_cast<int>(k)}, 1,
                                  typename Output::Params(), a, w, acc, acc, 0, 0, 0, 0, lda, ldb, n, n);
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return -1;
    if (Gemm::get_workspace_size(args) != 0) return -1;  // kGemm without split-K needs none
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return -1;
    if (gemm.run(stream) != cutlass::Status::kSuccess) {
      const cudaError_t err = cudaGetLastError();
      return err == cudaSuccess ? static_cast<int>(cudaErrorLaunchFailure) : static_cast<int>(err);
    }
    return 0;
  }
};

using SmallM = MixedGemm<GemmShape<64, 64, 64>, GemmShape<32, 32, 64>, 4>;
using LargeM = MixedGemm<GemmShape<128, 128, 64>, GemmShape<64, 64, 64>, 4>;

}  // namespace

// lda in int8 elements, ldb in int4 elements (= 2 x bytes per weight row).
int gemm_sm80_s8s4(const std::int8_t* a, std::int64_t lda, const void* w, std::int64_t ldb, std::int32_t* acc,
                   std::int64_t m, std::int64_t n, std::int64_t k, Stream stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (m <= 64) return SmallM::run(a, lda, w, ldb, acc, m, n, k, s);
  return LargeM::run(a, lda, w, ldb, acc, m, n, k, s);
}

}  // namespace osengine::detail::cuda
