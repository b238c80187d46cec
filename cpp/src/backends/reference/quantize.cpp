// Scalar reference for activation quantization: the oracle. Written for clarity, not speed.
#include <algorithm>
#include <cmath>

#include "core/float_math.hpp"
#include "backends/reference/reference.hpp"

namespace osengine::detail {

namespace {

float load_x(const QuantizeProblem& p, std::int64_t index) {
  if (p.x_dtype == DType::bfloat16) return bf16_to_float(static_cast<const std::uint16_t*>(p.x)[index]);
  return static_cast<const float*>(p.x)[index];
}

std::int8_t quantize_value(float y, float delta, std::int32_t zero_point, int qmin, int qmax) {
  float v = std::nearbyint(y / delta) + static_cast<float>(zero_point);
  v = std::fmin(std::fmax(v, static_cast<float>(qmin)), static_cast<float>(qmax));
  return static_cast<std::int8_t>(v);
}

}  // namespace

float rms_norm_factor(const float* x, std::int64_t k, float eps) {
  float partial[8] = {};
  for (std::int64_t i = 0; i < k; ++i) partial[i % 8] = std::fma(x[i], x[i], partial[i % 8]);
  const float sum = ((partial[0] + partial[4]) + (partial[2] + partial[6])) +
                    ((partial[1] + partial[5]) + (partial[3] + partial[7]));
  return 1.0f / std::sqrt(sum / static_cast<float>(k) + eps);
}

std::int64_t quantize_reference(const QuantizeProblem& p) {
  const std::int64_t groups = p.k / p.group_size;
  std::vector<float> y(static_cast<std::size_t>(p.k));
  std::vector<float> rotated(p.rotate ? static_cast<std::size_t>(p.k) : 0);
  for (std::int64_t row = 0; row < p.m; ++row) {
    // 1. the prologue: x, silu(gate) * up, or the RMSNorm w * (x * r) (the gate and the norm never come together)
    for (std::int64_t col = 0; col < p.k; ++col) {
      float v = load_x(p, row * p.x_row_elements() + col);
      if (p.silu_gate) v = silu_approx(v) * load_x(p, row * p.x_row_elements() + p.k + col);  // silu(gate) * up
      y[static_cast<std::size_t>(col)] = v;
    }
    if (p.rms_norm_weight) {
      const float r = rms_norm_factor(y.data(), p.k, p.rms_norm_eps);
      if (!std::isfinite(r) || r == 0.0f) return row;  // the sum of squares overflowed
      for (std::int64_t col = 0; col < p.k; ++col)
        y[static_cast<std::size_t>(col)] = p.rms_norm_weight[col] * (y[static_cast<std::size_t>(col)] * r);
    }
    // 2. the online rotation x H / sqrt(k) (core/hadamard.hpp: the normative order)
    if (p.rotate) {
      hadamard_transform_row(p.hadamard, y.data(), rotated.data());
      y.swap(rotated);
    }
    // 3. y = (x - shift) / smooth_scale
    for (std::int64_t col = 0; col < p.k; ++col) {
      float v = y[static_cast<std::size_t>(col)];
      if (p.shift) v = v - p.shift[col];
      if (p.smooth_scale) v = v / p.smooth_scale[col];
      if (!std::isfinite(v)) return row;
      y[static_cast<std::size_t>(col)] = v;
    }
    for (std::int64_t g = 0; g < groups; ++g) {
      const float* yg = y.data() + g * p.group_size;
      float delta;
      std::int32_t zero_point;
      if (p.dynamic) {
        float lo = 0.0f, hi = 0.0f;  // the range always includes 0
        for (std::int64_t i = 0; i < p.group_size; ++i) {
          lo = std::fmin(lo, yg[i]);
          hi = std::fmax(hi, yg[i]);
        }
        if (p.symmetric) {
          delta = std::fmax(-lo, hi) / static_cast<float>(p.qmax);
          zero_point = 0;
        } else {
          delta = (hi - lo) / static_cast<float>(p.qmax - p.qmin);
        }
        if (!(delta > 0.0f)) delta = 1.0f;
        if (!p.symmetric) {
          float zp = static_cast<float>(p.qmin) - std::nearbyint(lo / delta);
          zp = std::fmin(std::fmax(zp, static_cast<float>(p.qmin)), static_cast<float>(p.qmax));
          zero_point = static_cast<std::int32_t>(zp);
        }
        p.out_delta[row * groups + g] = delta;
        p.out_zero_point[row * groups + g] = zero_point;
      } else {
        delta = p.delta[g * p.param_stride];
        zero_point = p.zero_point ? p.zero_point[g * p.param_stride] : 0;
      }
      std::int8_t* out = p.codes + row * p.k + g * p.group_size;
      for (std::int64_t i = 0; i < p.group_size; ++i) out[i] = quantize_value(yg[i], delta, zero_point, p.qmin, p.qmax);
    }
  }
  return -1;
}

}  // namespace osengine::detail
