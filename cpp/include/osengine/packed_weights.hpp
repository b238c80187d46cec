// Quantized weights packed once, at load time, into one backend's GEMM layout.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "osengine/backend.hpp"
#include "osengine/tensor.hpp"

namespace osengine {

namespace detail {
struct Kernels;

// Storage that starts on a 64-byte cache line: a packed panel step the size of a vector register (64 bytes in the
// AVX-512 layout) then never straddles two lines. malloc gives 16-byte alignment only (large blocks sit 16 bytes
// past a page), which made every 64-byte load of a streamed weight matrix touch two lines.
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{64};
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}  // NOLINT: allocators convert implicitly
  T* allocate(std::size_t count) { return static_cast<T*>(::operator new(count * sizeof(T), kAlignment)); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, kAlignment); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const noexcept { return false; }
};
using CacheLineBytes = std::vector<std::uint8_t, CacheLineAllocator<std::uint8_t>>;
}  // namespace detail

class PackedWeights {
 public:
  // weights: int8 codes [N, K] (bits = 8, values in [-127, 127]: symmetric int8 never produces -128, and the AVX2
  // kernel's exactness relies on it) or int4 [N, K/2] packed as in int4.hpp (bits = 4, values in [-8, 7]).
  // group_size: 0 (per-channel / per-tensor scales) or a divisor of K (per-group scales, and the
  // zero-point column sums are kept per group). backend: the layout to pack for (automatic = fastest here).
  // backend: a built-in Backend or a registered backend's name (registered_backends()).
  // weight_scale (optional, host float32): the weights' scales, one value, [N] or [N, num_groups], positive and
  // finite. Weights that carry their scales are checked once, here, and gemm() then takes no w_scale: a decode step
  // would otherwise re-read and re-check every scale of the model (for int4 groups of 32, a fifth of the weight bytes).
  static PackedWeights pack(const TensorView& weights, int bits, std::int64_t group_size = 0,
                            const BackendChoice& backend = Backend::automatic, const TensorView& weight_scale = {});

  std::int64_t n() const { return n_; }
  std::int64_t k() const { return k_; }
  int bits() const { return bits_; }
  std::int64_t group_size() const { return group_size_; }
  std::int64_t num_groups() const { return group_size_ > 0 ? k_ / group_size_ : 1; }
  Backend backend() const { return backend_; }
  // The name of the backend the weights were packed for (a variant registered at run time has its own).
  const std::string& backend_name() const;
  // The registered backend (its kernels) the weights were packed for; the GEMM runs on it.
  const detail::Kernels* kernels() const { return kernels_; }

  // sum_k W[n, k] per group: [num_groups, N] int32 (row-major). Used for the activation zero-point correction.
  const std::vector<std::int32_t>& column_sums() const { return column_sums_; }
  // The scales given to pack(): float32 [N, weight_scale_groups()] row-major (one value is expanded to [N]);
  // empty when the weights carry none.
  bool has_weight_scales() const { return !weight_scales_.empty(); }
  const std::vector<float>& weight_scales() const { return weight_scales_; }
  // 1 (one scale per output channel) or num_groups() (one per channel and group).
  std::int64_t weight_scale_groups() const { return weight_scale_groups_; }
  // The backend's own arrangement of those scales (detail::Kernels::arrange_weight_scales): float32, or float16 bits
  // when every scale is exactly a float16; either or both may be empty.
  const std::vector<float>& arranged_weight_scales() const { return arranged_weight_scales_; }
  const std::vector<std::uint16_t>& arranged_weight_scales_f16() const { return arranged_weight_scales_f16_; }
  // Bytes held by the packed layout (weights only; device memory for the CUDA backend).
  std::size_t nbytes() const { return device_data_ ? device_nbytes_ : data_.size(); }
  // Recover the int8 codes [N, K]: out must be an int8 [N, K] contiguous view.
  void unpack(const TensorView& out) const;
  // Recover the int8 codes of some rows (output channels): rows int32 [R] with values in [0, N), out int8 [R, K]
  // contiguous. Reads only those rows (an int8 embedding table can live in a GEMM's packed weights: tied lm_head).
  // CPU backends; on the CUDA backend the layout is read back first (slow: for tests only).
  void unpack_rows(const TensorView& rows, const TensorView& out) const;

  // Layout-specific storage; read by the kernels.
  const std::uint8_t* data() const { return data_.data(); }
  std::int64_t padded_n() const { return padded_n_; }
  std::int64_t padded_k() const { return padded_k_; }
  // CUDA backend: the layout (int8 [N, K] or int4 packed [N, K/2], as the reference's) and the column sums live in
  // device memory on GPU device_index(); data() is then empty. Copies of a PackedWeights share the device buffers.
  const void* device_data() const { return device_data_.get(); }
  const std::int32_t* device_column_sums() const { return static_cast<const std::int32_t*>(device_column_sums_.get()); }
  const float* device_weight_scales() const { return static_cast<const float*>(device_weight_scales_.get()); }
  int device_index() const { return device_index_; }

  PackedWeights() = default;

 private:
  friend struct PackedWeightsBuilder;
  std::int64_t n_ = 0, k_ = 0, padded_n_ = 0, padded_k_ = 0, group_size_ = 0, weight_scale_groups_ = 1;
  int bits_ = 8;
  Backend backend_ = Backend::reference;
  const detail::Kernels* kernels_ = nullptr;
  detail::CacheLineBytes data_;
  std::vector<std::int32_t> column_sums_;
  std::vector<float> weight_scales_;
  std::vector<float> arranged_weight_scales_;
  std::vector<std::uint16_t> arranged_weight_scales_f16_;
  std::shared_ptr<void> device_data_, device_column_sums_, device_weight_scales_;
  std::size_t device_nbytes_ = 0;
  int device_index_ = -1;
};

// Column sums of int8 codes [N, K] per group: out int32 [num_groups, N].
void column_sums(const TensorView& weights_int8, std::int64_t group_size, const TensorView& out);

}  // namespace osengine
