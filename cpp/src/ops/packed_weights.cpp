#include "osengine/packed_weights.hpp"

#include <cstring>
#include <sstream>

#include "core/checks.hpp"
#include "backends/kernels.hpp"
#include "osengine/int4.hpp"

namespace osengine {

namespace {

void compute_column_sums(const std::int8_t* codes, std::int64_t n, std::int64_t k, std::int64_t group_size,
                         std::int32_t* out) {
  const std::int64_t group = group_size > 0 ? group_size : k;
  const std::int64_t groups = k / group;
  for (std::int64_t g = 0; g < groups; ++g)
    for (std::int64_t row = 0; row < n; ++row) {
      std::int32_t sum = 0;
      for (std::int64_t i = g * group; i < (g + 1) * group; ++i) sum += codes[row * k + i];
      out[g * n + row] = sum;
    }
}

}  // namespace

struct PackedWeightsBuilder {
  static PackedWeights build(const detail::Kernels& kernels, const std::int8_t* codes, std::int64_t n, std::int64_t k,
                             int bits, std::int64_t group_size, int device_index) {
    PackedWeights w;
    w.n_ = n;
    w.k_ = k;
    w.bits_ = bits;
    w.group_size_ = group_size;
    w.backend_ = kernels.id;
    w.kernels_ = &kernels;
    w.column_sums_.resize(static_cast<std::size_t>(w.num_groups() * n));
    compute_column_sums(codes, n, k, group_size, w.column_sums_.data());
    detail::WeightLayout layout = kernels.pack_weights(codes, n, k, bits, group_size);
    w.padded_n_ = layout.padded_n;
    w.padded_k_ = layout.padded_k;
    if (kernels.device != Device::cpu) {
      // Device memory only; no host copy is kept.
      w.device_index_ = device_index;
      w.device_nbytes_ = layout.data.size();
      w.device_data_ = kernels.upload(layout.data.data(), layout.data.size(), device_index);
      w.device_column_sums_ = kernels.upload(w.column_sums_.data(), w.column_sums_.size() * sizeof(std::int32_t),
                                             device_index);
      return w;
    }
    w.data_ = std::move(layout.data);
    return w;
  }

  // Checks the scales against the packed weights and keeps a copy ([N] or [N, groups]; device memory too).
  static void attach_weight_scales(PackedWeights& w, const detail::Checker& check, const TensorView& scale) {
    if (!scale.defined()) return;
    if (scale.device != Device::cpu)
      check.fail_type("weight_scale", "must be in host memory (it is copied next to the weights, on their device)");
    check.tensor(scale, "weight_scale", {DType::float32});
    std::int64_t stride_row = 0, stride_group = 0;
    check.scale_strides(scale, "weight_scale", w.n_, "output channel", w.num_groups(), stride_row, stride_group);
    const std::int64_t count = scale.numel(), columns = stride_group == 1 ? w.num_groups() : 1;
    check.positive_finite(scale, "weight_scale");
    const float* src = scale.ptr<const float>();
    if (count == 1)
      w.weight_scales_.assign(static_cast<std::size_t>(w.n_), src[0]);
    else
      w.weight_scales_.assign(src, src + count);  // contiguous: checked above
    w.weight_scale_groups_ = columns;
    if (w.kernels_->arrange_weight_scales != nullptr) {
      detail::ArrangedScales arranged = w.kernels_->arrange_weight_scales(w.weight_scales_.data(), w.n_, columns, w.bits_);
      w.arranged_weight_scales_ = std::move(arranged.f32);
      w.arranged_weight_scales_f16_ = std::move(arranged.f16);
    }
    if (w.kernels_->device != Device::cpu)  // the host copy stays too (small; weight_scales() reads it)
      w.device_weight_scales_ =
          w.kernels_->upload(w.weight_scales_.data(), w.weight_scales_.size() * sizeof(float), w.device_index_);
  }
};

namespace detail {
PackedWeights pack_weights_with(const Kernels& kernels, const std::int8_t* codes, std::int64_t n, std::int64_t k,
                                int bits, std::int64_t group_size, int device_index) {
  return PackedWeightsBuilder::build(kernels, codes, n, k, bits, group_size, device_index);
}
}  // namespace detail

const std::string& PackedWeights::backend_name() const {
  static const std::string none = "none";
  return kernels_ != nullptr ? kernels_->name : none;
}

PackedWeights PackedWeights::pack(const TensorView& weights, int bits, std::int64_t group_size,
                                  const BackendChoice& choice, const TensorView& weight_scale) {
  const std::string& backend = choice.name();
  const detail::Checker check("pack_weights");
  if (bits != 8 && bits != 4) check.fail("bits", "must be 8 or 4, got " + std::to_string(bits));
  // CUDA: weights given on the GPU are read back once (packing is a load-time step); the layout goes to that GPU
  // (or to the current one for host weights). Without the CUDA backend, the checks below refuse both.
  if ((weights.device == Device::cuda || backend == "cuda") && has_cuda_backend()) {
    const detail::Kernels& cuda = detail::kernels_for(Backend::cuda, "pack_weights");
    if (backend != "cuda" && backend != "auto")
      check.fail_type("weights", std::string("is a CUDA tensor but backend '") + backend +
                                     "' runs on the CPU; use backend 'cuda' or 'auto'");
    TensorView host = weights;
    std::vector<std::uint8_t> staging;
    int device_index = cuda.current_device();
    if (weights.device == Device::cuda) {
      const detail::Checker device_check("pack_weights", Device::cuda, weights.device_index);
      device_check.tensor(weights, "weights", {DType::uint8, DType::int8}, 2);
      staging.resize(static_cast<std::size_t>(weights.numel()));
      cuda.download(weights.data, staging.data(), staging.size(), weights.device_index);
      host = TensorView(staging.data(), weights.dtype, weights.shape);
      device_index = weights.device_index;
    }
    PackedWeights cpu = pack(host, bits, group_size, Backend::reference);
    std::vector<std::int8_t> codes(static_cast<std::size_t>(cpu.n() * cpu.k()));
    cpu.unpack(TensorView(codes.data(), DType::int8, {cpu.n(), cpu.k()}));
    PackedWeights packed = PackedWeightsBuilder::build(cuda, codes.data(), cpu.n(), cpu.k(), bits, group_size, device_index);
    PackedWeightsBuilder::attach_weight_scales(packed, check, weight_scale);
    return packed;
  }
  check.tensor(weights, "weights", bits == 8 ? std::initializer_list<DType>{DType::int8}
                                              : std::initializer_list<DType>{DType::uint8, DType::int8}, 2);
  check.not_empty(weights, "weights");
  const std::int64_t n = weights.size(0);
  const std::int64_t k = bits == 8 ? weights.size(1) : weights.size(1) * 2;
  if (k > 65536) check.fail("weights", "K must be <= 65536 so that int32 accumulation stays exact, got K = " + std::to_string(k));
  if (group_size < 0) check.fail("group_size", "must be >= 0 (0 = no groups)");
  if (group_size > 0 && k % group_size != 0) {
    std::ostringstream msg;
    msg << "must divide K = " << k << ", got " << group_size;
    check.fail("group_size", msg.str());
  }
  if (group_size > 0 && group_size % 2 != 0) check.fail("group_size", "must be even, got " + std::to_string(group_size));
  const detail::Kernels& kernels = detail::resolve_cpu_kernels(backend, "pack_weights");

  std::vector<std::int8_t> codes(static_cast<std::size_t>(n * k));
  if (bits == 8) {
    const auto* src = weights.ptr<const std::int8_t>();
    for (std::int64_t i = 0; i < n * k; ++i) {
      if (src[i] == -128)
        check.fail("weights", "int8 weight codes must lie in [-127, 127] (symmetric quantization); found -128 at row " +
                                  std::to_string(i / k) + ", column " + std::to_string(i % k));
      codes[static_cast<std::size_t>(i)] = src[i];
    }
  } else {
    unpack_int4(weights, TensorView(codes.data(), DType::int8, {n, k}));
  }
  PackedWeights packed = PackedWeightsBuilder::build(kernels, codes.data(), n, k, bits, group_size, -1);
  PackedWeightsBuilder::attach_weight_scales(packed, check, weight_scale);
  return packed;
}

void PackedWeights::unpack(const TensorView& out) const {
  const detail::Checker check("PackedWeights.unpack");
  check.tensor(out, "out", {DType::int8}, 2);
  if (out.size(0) != n_ || out.size(1) != k_)
    check.fail("out", "must have shape [" + std::to_string(n_) + ", " + std::to_string(k_) + "], got " + out.shape_string());
  if (kernels_ == nullptr) check.fail("weights", "are empty (default-constructed PackedWeights)");
  if (kernels_->device != Device::cpu) {
    // Device layout = the reference layout: read it back and decode it on the host.
    std::vector<std::uint8_t> layout(device_nbytes_);
    kernels_->download(device_data_.get(), layout.data(), layout.size(), device_index_);
    if (bits_ == 8) {
      std::memcpy(out.data, layout.data(), layout.size());
    } else {
      unpack_int4(TensorView(layout.data(), DType::uint8, {n_, k_ / 2}), TensorView(out.data, DType::int8, {n_, k_}));
    }
    return;
  }
  kernels_->unpack_weights(*this, nullptr, n_, out.ptr<std::int8_t>());
}

void PackedWeights::unpack_rows(const TensorView& rows, const TensorView& out) const {
  const detail::Checker check("PackedWeights.unpack_rows");
  check.tensor(rows, "rows", {DType::int32}, 1);
  check.tensor(out, "out", {DType::int8}, 2);
  const std::int64_t count = rows.size(0);
  if (out.size(0) != count || out.size(1) != k_)
    check.fail("out", "must have shape [" + std::to_string(count) + ", " + std::to_string(k_) + "], got " +
                          out.shape_string());
  const auto* index = rows.ptr<const std::int32_t>();
  for (std::int64_t i = 0; i < count; ++i)
    if (index[i] < 0 || index[i] >= n_)
      check.fail("rows", "must lie in [0, " + std::to_string(n_) + "); found " + std::to_string(index[i]) +
                             " at index " + std::to_string(i));
  if (count == 0) return;
  if (kernels_ == nullptr) check.fail("weights", "are empty (default-constructed PackedWeights)");
  if (kernels_->device != Device::cpu) {
    std::vector<std::int8_t> all(static_cast<std::size_t>(n_ * k_));
    unpack(TensorView(all.data(), DType::int8, {n_, k_}));
    for (std::int64_t i = 0; i < count; ++i)
      std::memcpy(out.ptr<std::int8_t>() + i * k_, all.data() + index[i] * k_, static_cast<std::size_t>(k_));
    return;
  }
  kernels_->unpack_weights(*this, index, count, out.ptr<std::int8_t>());
}

void column_sums(const TensorView& weights_int8, std::int64_t group_size, const TensorView& out) {
  const detail::Checker check("column_sums");
  check.tensor(weights_int8, "weights", {DType::int8}, 2);
  const std::int64_t n = weights_int8.size(0), k = weights_int8.size(1);
  if (group_size < 0 || (group_size > 0 && k % group_size != 0))
    check.fail("group_size", "must be 0 or divide K = " + std::to_string(k) + ", got " + std::to_string(group_size));
  const std::int64_t groups = group_size > 0 ? k / group_size : 1;
  check.tensor(out, "out", {DType::int32}, 2);
  if (out.size(0) != groups || out.size(1) != n)
    check.fail("out", "must have shape [" + std::to_string(groups) + ", " + std::to_string(n) + "], got " + out.shape_string());
  compute_column_sums(weights_int8.ptr<const std::int8_t>(), n, k, group_size, out.ptr<std::int32_t>());
}

}  // namespace osengine
