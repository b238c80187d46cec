// Activation quantization: validation and dispatch.
#include "osengine/quantize.hpp"

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "core/checks.hpp"
#include "core/float_math.hpp"
#include "core/hadamard.hpp"
#include "backends/kernels.hpp"
#include "osengine/errors.hpp"
#include "osengine/hadamard.hpp"

namespace osengine {

CodeRange code_range(int bits, bool symmetric) {
  const int half = 1 << (bits - 1);
  return symmetric ? CodeRange{-(half - 1), half - 1} : CodeRange{-half, half - 1};
}

namespace {

detail::QuantizeProblem common_problem(const detail::Checker& check, const TensorView& x, const TensorView& shift,
                                       const TensorView& smooth_scale, const TensorView& out_codes,
                                       const QuantizeOptions& options) {
  if (options.bits < 2 || options.bits > 8)
    check.fail("bits", "must be in 2..8, got " + std::to_string(options.bits));
  if (x.device == Device::cuda)
    check.tensor(x, "x", {DType::float32, DType::bfloat16, DType::float16}, 2);
  else
    check.tensor(x, "x", {DType::float32, DType::bfloat16}, 2);
  check.not_empty(x, "x");
  const std::int64_t m = x.size(0), x_cols = x.size(1);
  if (options.silu_gate) {
    if (x.device == Device::cuda)
      throw UnsupportedError(std::string("osengine.") + check.op() +
                             ": the fused SiLU gate (silu_gate) runs on the CPU backends only");
    if (x_cols % 2 != 0)
      check.fail("x", "must hold [gate | up] (an even number of columns) with silu_gate, got shape " +
                          x.shape_string());
    if (options.rms_norm_weight.defined())
      check.fail("rms_norm_weight", "cannot be combined with silu_gate (one prologue per quantization)");
  }
  const std::int64_t k = options.silu_gate ? x_cols / 2 : x_cols;
  if (options.group_size < 0) check.fail("group_size", "must be >= 0 (0 = no groups)");
  if (options.group_size > 0 && k % options.group_size != 0) {
    std::ostringstream msg;
    msg << "must divide K = " << k << (options.silu_gate ? " (half the columns of x: silu_gate)" : " (the last dimension of x)")
        << ", got " << options.group_size;
    check.fail("group_size", msg.str());
  }
  for (const auto* arg : {&shift, &smooth_scale}) {
    if (!arg->defined()) continue;
    const char* name = arg == &shift ? "shift" : "smooth_scale";
    check.tensor(*arg, name, {DType::float32}, 1);
    check.dim_equals(*arg, name, 0, k, "K, one value per channel of x");
  }
  if (shift.defined()) check.finite(shift, "shift");
  const TensorView& norm = options.rms_norm_weight;
  if (norm.defined()) {
    if (x.device == Device::cuda)
      throw UnsupportedError(std::string("osengine.") + check.op() +
                             ": the fused RMSNorm (rms_norm_weight) runs on the CPU backends only");
    check.tensor(norm, "rms_norm_weight", {DType::float32}, 1);
    check.dim_equals(norm, "rms_norm_weight", 0, k, "K, one value per channel of x");
    check.finite(norm, "rms_norm_weight");
    if (!(options.rms_norm_eps > 0.0f) || !std::isfinite(options.rms_norm_eps))
      check.fail("rms_norm_eps", "must be positive and finite, got " + std::to_string(options.rms_norm_eps));
  }
  if (smooth_scale.defined()) check.positive_finite(smooth_scale, "smooth_scale");
  // The rotation is over the whole row of K values (groups split the rotated row): K must be a Hadamard order.
  if (options.rotate && !is_hadamard_order(k)) {
    std::ostringstream msg;
    msg << "no Hadamard matrix of order K = " << k
        << (options.silu_gate ? " (half the columns of x: silu_gate)" : " (the last dimension of x)")
        << " is constructed here; supported orders are " << detail::hadamard_supported_forms();
    check.fail("rotate", msg.str());
  }
  check.tensor(out_codes, "out_codes", {DType::int8}, 2);
  if (out_codes.size(0) != m || out_codes.size(1) != k)
    check.fail("out_codes", std::string(options.silu_gate ? "must be [M, K] for x = [gate | up] of shape "
                                                          : "must have the shape of x ") +
                                x.shape_string() + ", got " + out_codes.shape_string());

  detail::QuantizeProblem p;
  p.x = x.data;
  p.x_dtype = x.dtype;
  p.m = m;
  p.k = k;
  p.x_stride = x_cols;
  p.silu_gate = options.silu_gate;
  p.shift = shift.defined() ? shift.ptr<const float>() : nullptr;
  p.smooth_scale = smooth_scale.defined() ? smooth_scale.ptr<const float>() : nullptr;
  p.rms_norm_weight = norm.defined() ? norm.ptr<const float>() : nullptr;
  p.rms_norm_eps = options.rms_norm_eps;
  p.rotate = options.rotate;
  if (options.rotate) p.hadamard = detail::hadamard_plan(k);
  p.group_size = options.group_size > 0 ? options.group_size : k;
  const CodeRange range = code_range(options.bits, options.symmetric);
  p.qmin = range.qmin;
  p.qmax = range.qmax;
  p.symmetric = options.symmetric;
  p.codes = out_codes.ptr<std::int8_t>();
  return p;
}

// The op runs where x lives; every other tensor must be there too.
detail::Checker checker_for(const char* op, const TensorView& x) { return detail::Checker(op, x.device, x.device_index); }

// Runs where x lives: on the GPU backend for CUDA data, else on the chosen (or best) CPU backend.
std::int64_t run_quantize(detail::QuantizeProblem& p, const TensorView& x, const QuantizeOptions& options,
                          const char* op) {
  const std::string& backend = options.backend.name();
  if (x.device == Device::cuda) {  // validation let it through: this build has the CUDA backend
    if (backend != "auto" && backend != "cuda")
      throw UnsupportedError(std::string("osengine.") + op + ": backend '" + backend +
                             "' runs on CPU data, but x is a CUDA tensor; use backend 'cuda' or 'auto'");
    p.device_index = x.device_index;
    p.stream = options.stream;
    return detail::kernels_for(Backend::cuda, op).quantize(p);
  }
  return detail::resolve_cpu_kernels(backend, op).quantize(p);
}

[[noreturn]] void report_nonfinite(const detail::Checker& check, const detail::QuantizeProblem& p, std::int64_t row) {
  for (std::int64_t col = 0; col < p.x_row_elements(); ++col) {
    const std::int64_t i = row * p.x_row_elements() + col;
    const float v = p.x_dtype == DType::bfloat16 ? detail::bf16_to_float(static_cast<const std::uint16_t*>(p.x)[i])
                                                 : static_cast<const float*>(p.x)[i];
    if (!std::isfinite(v)) {
      std::ostringstream msg;
      msg << "contains a non-finite value (" << v << ") at row " << row << ", column " << col
          << "; activations must be finite";
      check.fail("x", msg.str());
    }
  }
  // x is finite in this row: find the stage that overflowed by recomputing the row as the reference does.
  std::ostringstream msg;
  const auto load = [&](std::int64_t col) {
    const std::int64_t i = row * p.x_row_elements() + col;
    return p.x_dtype == DType::bfloat16 ? detail::bf16_to_float(static_cast<const std::uint16_t*>(p.x)[i])
                                        : static_cast<const float*>(p.x)[i];
  };
  std::vector<float> y(static_cast<std::size_t>(p.k));
  for (std::int64_t col = 0; col < p.k; ++col)
    y[static_cast<std::size_t>(col)] = p.silu_gate ? detail::silu_approx(load(col)) * load(p.k + col) : load(col);
  if (p.rms_norm_weight) {
    const float r = detail::rms_norm_factor(y.data(), p.k, p.rms_norm_eps);
    if (!std::isfinite(r) || r == 0.0f) {
      msg << "the sum of squares of row " << row << " overflows float32 in the fused RMSNorm; x is too large to be "
          << "normalized in fp32";
      check.fail("x", msg.str());
    }
    for (std::int64_t col = 0; col < p.k; ++col)
      y[static_cast<std::size_t>(col)] = p.rms_norm_weight[col] * (y[static_cast<std::size_t>(col)] * r);
  }
  const auto all_finite = [](const std::vector<float>& v) {
    for (float e : v)
      if (!std::isfinite(e)) return false;
    return true;
  };
  if (!all_finite(y)) {
    if (p.silu_gate)
      msg << "silu(gate) * up overflows to a non-finite value in row " << row << " although x is finite there";
    else
      msg << "the fused RMSNorm w * (x * r) overflows to a non-finite value in row " << row
          << " although x is finite there";
    check.fail(p.silu_gate ? "x" : "rms_norm_weight", msg.str());
  }
  if (p.rotate) {
    std::vector<float> rotated(y.size());
    detail::hadamard_transform_row(p.hadamard, y.data(), rotated.data());
    if (!all_finite(rotated)) {
      msg << "the Hadamard rotation (rotate) of row " << row << " overflows float32 although x is finite there; the "
          << "row's values are too large to be summed in fp32";
      check.fail("rotate", msg.str());
    }
  }
  msg << "(x - shift) / smooth_scale overflows to a non-finite value in row " << row
      << " although x is finite there; check that smooth_scale is not tiny";
  check.fail("smooth_scale", msg.str());
}

}  // namespace

void quantize_static(const TensorView& x, const TensorView& shift, const TensorView& smooth_scale,
                     const TensorView& delta, const TensorView& zero_point, const TensorView& out_codes,
                     const QuantizeOptions& options) {
  const detail::Checker check = checker_for("quantize_static", x);
  detail::QuantizeProblem p = common_problem(check, x, shift, smooth_scale, out_codes, options);
  const std::int64_t groups = p.k / p.group_size;
  check.tensor(delta, "delta", {DType::float32});
  if (delta.numel() != 1 && delta.numel() != groups) {
    std::ostringstream msg;
    msg << "must hold one value or one per group (" << groups << "), got shape " << delta.shape_string();
    check.fail("delta", msg.str());
  }
  check.positive_finite(delta, "delta");
  if (zero_point.defined()) {
    check.tensor(zero_point, "zero_point", {DType::int32});
    if (zero_point.numel() != delta.numel())
      check.fail("zero_point", "must have as many values as delta (" + std::to_string(delta.numel()) + "), got shape " +
                                   zero_point.shape_string());
    if (options.symmetric)
      check.int_range(zero_point, "zero_point", 0, 0);
    else
      check.int_range(zero_point, "zero_point", p.qmin, p.qmax);
    p.zero_point = zero_point.ptr<const std::int32_t>();
  }
  p.delta = delta.ptr<const float>();
  p.param_stride = delta.numel() == 1 ? 0 : 1;
  p.dynamic = false;
  const std::int64_t bad_row = run_quantize(p, x, options, "quantize_static");
  if (bad_row >= 0) report_nonfinite(check, p, bad_row);
}

void quantize_dynamic(const TensorView& x, const TensorView& shift, const TensorView& smooth_scale,
                      const TensorView& out_codes, const TensorView& out_delta, const TensorView& out_zero_point,
                      const QuantizeOptions& options) {
  const detail::Checker check = checker_for("quantize_dynamic", x);
  detail::QuantizeProblem p = common_problem(check, x, shift, smooth_scale, out_codes, options);
  const std::int64_t groups = p.k / p.group_size;
  check.tensor(out_delta, "out_delta", {DType::float32});
  check.tensor(out_zero_point, "out_zero_point", {DType::int32});
  for (const auto* arg : {&out_delta, &out_zero_point}) {
    if (arg->numel() != p.m * groups) {
      std::ostringstream msg;
      msg << "must hold one value per row" << (groups > 1 ? " and group" : "") << " ([" << p.m;
      if (groups > 1) msg << ", " << groups;
      msg << "]), got shape " << arg->shape_string();
      check.fail(arg == &out_delta ? "out_delta" : "out_zero_point", msg.str());
    }
  }
  p.out_delta = out_delta.ptr<float>();
  p.out_zero_point = out_zero_point.ptr<std::int32_t>();
  p.dynamic = true;
  const std::int64_t bad_row = run_quantize(p, x, options, "quantize_dynamic");
  if (bad_row >= 0) report_nonfinite(check, p, bad_row);
}

}  // namespace osengine
