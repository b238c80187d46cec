// The GEMM epilogue's arithmetic in one host/device definition (see osengine/gemm.hpp for the formula): every backend
// computes each output element with these steps, in this order, so they agree bit for bit. The AVX2 kernels apply
// the same operations to 8 lanes at a time (backends/avx2/gemm_common.hpp).
#pragma once
#include <cstdint>

#include "core/float_math.hpp"
#include "osengine/gemm.hpp"

namespace osengine::detail {

OSENGINE_HD float apply_activation(Activation activation, float x) {
  switch (activation) {
    case Activation::none: return x;
    case Activation::relu: return fmax_f(x, 0.0f);
    case Activation::gelu: return gelu_approx(x);
    case Activation::gelu_tanh: return gelu_tanh_approx(x);
    case Activation::silu: return silu_approx(x);
  }
  return x;
}

// One group's term, starting from y = bias (or 0) and taken for the groups in order:
//   y = fma(float(acc - zero_point * column_sum), a_scale * w_scale, y)      (the correction is exact int32)
OSENGINE_HD float epilogue_group(float y, std::int32_t acc, std::int32_t zero_point, std::int32_t column_sum,
                                 float a_scale, float w_scale) {
  const std::int32_t corrected = acc - zero_point * column_sum;
  return fma_rn(static_cast<float>(corrected), mul_rn(a_scale, w_scale), y);
}

// After the last group: the activation, then the residual (pass has_residual = false for none).
OSENGINE_HD float epilogue_finish(Activation activation, float y, bool has_residual, float residual) {
  y = apply_activation(activation, y);
  return has_residual ? add_rn(y, residual) : y;
}

}  // namespace osengine::detail
