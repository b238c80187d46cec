// CUTLASS 2.x tensor-core GEMMs for sm_80 (also run on sm_86 / sm_89): A row-major [m, k] x W [n, k] (column-major B,
// K contiguous: the packed weight layout) -> int32 accumulators [m, n], which the shift-add epilogue kernel consumes.
// The CUTLASS epilogue here only stores the accumulators (ScaleType::Nothing: D = acc, exact).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/cuda_kernels.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm.h"
#include "cutlass/numeric_types.h"

namespace osengine::detail::cuda::sm80 {

template <typename Element, typename TileShape, typename WarpShape, typename InstructionShape, int Stages>
struct AccumulateGemm {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte accesses
  using Output = cutlass::epilogue::thread::LinearCombination<std::int32_t, 4, std::int32_t, std::int32_t,
                                                              cutlass::epilogue::thread::ScaleType::Nothing>;
  using Gemm = cutlass::gemm::device::Gemm<Element, cutlass::layout::RowMajor, Element, cutlass::layout::ColumnMajor,
                                           std::int32_t, cutlass::layout::RowMajor, std::int32_t,
                                           cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape, WarpShape,
                                           InstructionShape, Output,
                                           cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Stages,
                                           kAlignment, kAlignment, false, cutlass::arch::OpMultiplyAddSaturate>;

  // Returns -1 when CUTLASS cannot run this problem, else a cudaError_t.
  static int run(const void* a, std::int64_t lda, const void* w, std::int64_t ldb, std::int32_t* acc, std::int64_t m,
                 std::int64_t n, std::int64_t k, cudaStream_t stream) {
    const cutlass::gemm::GemmCoord size(static_cast<int>(m), static_cast<int>(n), static_cast<int>(k));
    typename Gemm::Arguments args(
        size, {static_cast<const Element*>(a), static_cast<typename cutlass::layout::RowMajor::Stride::Index>(lda)},
        {static_cast<const Element*>(w), static_cast<typename cutlass::layout::ColumnMajor::Stride::Index>(ldb)},
        {acc, static_cast<typename cutlass::layout::RowMajor::Stride::Index>(n)},
        {acc, static_cast<typename cutlass::layout::RowMajor::Stride::Index>(n)});
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return -1;
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return -1;
    if (gemm.run(stream) != cutlass::Status::kSuccess) {
      const cudaError_t err = cudaGetLastError();
      return err == cudaSuccess ? static_cast<int>(cudaErrorLaunchFailure) : static_cast<int>(err);
    }
    return 0;
  }
};

}  // namespace osengine::detail::cuda::sm80
