// The CUDA backend's table entries (backends/cuda/dispatch.cpp; plain C++, no CUDA types). Problems hold device
// pointers; the work is queued on the problem's stream and nothing synchronizes. CUDA runtime failures throw
// UnsupportedError. Packed weights use the reference layout (reference/reference.hpp), uploaded to device memory.
#pragma once
#include <cstddef>
#include <memory>

#include "backends/kernels.hpp"

namespace osengine::detail {

void gemm_cuda(const GemmProblem& problem);
std::int64_t quantize_cuda(const QuantizeProblem& problem);
bool cuda_device_present();
int cuda_current_device();
std::shared_ptr<void> cuda_upload(const void* host, std::size_t bytes, int device_index);
void cuda_download(const void* device, void* host, std::size_t bytes, int device_index);

}  // namespace osengine::detail
