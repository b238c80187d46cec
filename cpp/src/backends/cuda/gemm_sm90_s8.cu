// W8A8 on sm_90a: CUTLASS 3.x CollectiveBuilder kernels (TMA loads, warp-specialized WGMMA s8 x s8 -> s32), int32
// accumulators stored by a TMA epilogue (D = acc: LinearCombination in int32 with alpha = 1 and no source, exact).
// M buckets: a 64-row warp-specialized tile for decode / small batches, a 128 x 128 cooperative tile with a 2 x 1
// cluster for prefill. Not yet measured on a GPU: see benchmarks/gemm.py --device cuda.
#include <cuda_runtime.h>

#include "backends/cuda/cuda_kernels.hpp"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace osengine::detail::cuda {

namespace {

using namespace cute;

template <typename TileShape, typename ClusterShape, typename KernelSchedule, typename EpilogueSchedule>
struct AccumulateGemm90 {
  using Fusion = cutlass::epilogue::fusion::LinearCombination<std::int32_t, std::int32_t, void, std::int32_t>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, std::int32_t, std::int32_t, void, cutlass::layout::RowMajor, 4,
      std::int32_t, cutlass::layout::RowMajor, 4, EpilogueSchedule, Fusion>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, std::int8_t, cutlass::layout::RowMajor, 16, std::int8_t,
      cutlass::layout::ColumnMajor, 16, std::int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static int run(const std::int8_t* a, std::int64_t lda, const std::int8_t* w, std::int64_t ldb, std::int32_t* acc,
                 std::int64_t m, std::int64_t n, std::int64_t k, cudaStream_t stream) {
    const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
    // Packed strides with the leading dimensions as the "K" extent give row strides lda / ldb.
    const auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{},
                                                           make_shape(M, static_cast<int>(lda), 1));
    const auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{},
                                                           make_shape(N, static_cast<int>(ldb), 1));
    const auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(M, N, 1));
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {M, N, K, 1},
                                  {a, stride_a, w, stride_b},
                                  {{}, nullptr, stride_d, acc, stride_d}};
    args.epilogue.thread.alpha = 1;
    args.epilogue.thread.beta = 0;
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return -1;
    const std::size_t workspace_size = Gemm::get_workspace_size(args);
    void* workspace = nullptr;
    if (workspace_size > 0 && cudaMallocAsync(&workspace, workspace_size, stream) != cudaSuccess)
      return static_cast<int>(cudaGetLastError());
    int result = 0;
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) {
      result = -1;
    } else if (gemm.run(stream) != cutlass::Status::kSuccess) {
      const cudaError_t err = cudaGetLastError();
      result = err == cudaSuccess ? static_cast<int>(cudaErrorLaunchFailure) : static_cast<int>(err);
    }
    if (workspace) cudaFreeAsync(workspace, stream);
    return result;
  }
};

using SmallM = AccumulateGemm90<Shape<_64, _128, _128>, Shape<_1, _1, _1>, cutlass::gemm::KernelTmaWarpSpecialized,
                                cutlass::epilogue::TmaWarpSpecialized>;
using LargeM = AccumulateGemm90<Shape<_128, _128, _128>, Shape<_2, _1, _1>,
                                cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                cutlass::epilogue::TmaWarpSpecializedCooperative>;

}  // namespace

int gemm_sm90_s8(const std::int8_t* a, std::int64_t lda, const std::int8_t* w, std::int64_t ldb, std::int32_t* acc,
                 std::int64_t m, std::int64_t n, std::int64_t k, Stream stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (m <= 64) return SmallM::run(a, lda, w, ldb, acc, m, n, k, s);
  return LargeM::run(a, lda, w, ldb, acc, m, n, k, s);
}

}  // namespace osengine::detail::cuda
