// Quantized GEMMs: validation and dispatch to the backend the weights were packed for.
#include "osengine/gemm.hpp"

#include <sstream>

#include "core/checks.hpp"
#include "backends/kernels.hpp"

namespace osengine {

const char* activation_name(Activation activation) {
  switch (activation) {
    case Activation::none: return "none";
    case Activation::relu: return "relu";
    case Activation::gelu: return "gelu";
    case Activation::gelu_tanh: return "gelu_tanh";
    case Activation::silu: return "silu";
  }
  return "unknown";
}

Activation parse_activation(const std::string& name) {
  for (Activation a : {Activation::none, Activation::relu, Activation::gelu, Activation::gelu_tanh, Activation::silu})
    if (name == activation_name(a)) return a;
  throw ArgumentError("gemm", "activation",
                      "unknown activation '" + name + "'; expected 'none', 'relu', 'gelu', 'gelu_tanh' or 'silu'");
}

namespace {

void check_activations(const detail::Checker& check, const TensorView& a, ActivationFormat format,
                       const PackedWeights& weights, detail::GemmProblem& p) {
  if (weights.n() == 0) check.fail("weights", "is empty (default-constructed PackedWeights); create it with PackedWeights::pack");
  if (format == ActivationFormat::int8) {
    check.tensor(a, "a", {DType::int8}, 2);
  } else {
    check.tensor(a, "a", {DType::uint8, DType::int8}, 2);
    if (weights.bits() != 4)
      check.fail("a", "packed int4 activations (W4A4) need int4 weights; these weights are int" +
                          std::to_string(weights.bits()));
  }
  check.not_empty(a, "a");
  const std::int64_t k = format == ActivationFormat::int8 ? a.size(1) : a.size(1) * 2;
  if (k != weights.k()) {
    std::ostringstream msg;
    msg << "K mismatch: a has K = " << k << (format == ActivationFormat::int4_packed ? " (packed int4: 2 per byte)" : "")
        << " but the weights have K = " << weights.k();
    check.fail("a", msg.str());
  }
  p.a = a.ptr<const std::int8_t>();
  p.a_format = format;
  p.m = a.size(0);
  p.n = weights.n();
  p.k = k;
  p.weights = &weights;
}

// CUDA-packed weights put the whole op on their GPU; CPU-packed weights keep it on the CPU.
detail::Checker checker_for(const char* op, const PackedWeights& weights) {
  if (weights.backend() == Backend::cuda) return detail::Checker(op, Device::cuda, weights.device_index());
  return detail::Checker(op);
}

// Runs on the backend the weights were packed for.
void dispatch(detail::GemmProblem& p, std::uintptr_t stream) {
  p.stream = stream;
  p.weights->kernels()->gemm(p);
}

}  // namespace

void gemm(const GemmArgs& args, const PackedWeights& weights) {
  const detail::Checker check = checker_for("gemm", weights);
  const bool on_cuda = weights.backend() == Backend::cuda;
  detail::GemmProblem p;
  check_activations(check, args.a, args.a_format, weights, p);
  const std::int64_t groups = weights.num_groups();

  check.tensor(args.a_scale, "a_scale", {DType::float32});
  check.scale_strides(args.a_scale, "a_scale", p.m, "token (row of a)", groups, p.a_scale_stride_m, p.a_scale_stride_g);
  check.positive_finite(args.a_scale, "a_scale");
  p.a_scale = args.a_scale.ptr<const float>();
  if (args.a_zero_point.defined()) {
    check.tensor(args.a_zero_point, "a_zero_point", {DType::int32});
    if (args.a_zero_point.shape != args.a_scale.shape)
      check.fail("a_zero_point", "must have the shape of a_scale " + args.a_scale.shape_string() + ", got " +
                                     args.a_zero_point.shape_string());
    if (args.a_format == ActivationFormat::int8)
      check.int_range(args.a_zero_point, "a_zero_point", -128, 127);
    else
      check.int_range(args.a_zero_point, "a_zero_point", -8, 7);
    p.a_zero_point = args.a_zero_point.ptr<const std::int32_t>();
  }
  if (weights.has_weight_scales()) {
    // Checked once when the weights were packed.
    if (args.w_scale.defined())
      check.fail("w_scale", "must not be given: these weights carry their scales (PackedWeights::pack with weight_scale)");
    p.w_scale = on_cuda ? weights.device_weight_scales() : weights.weight_scales().data();
    p.w_scale_stride_n = weights.weight_scale_groups();
    p.w_scale_stride_g = weights.weight_scale_groups() > 1 ? 1 : 0;
    if (!on_cuda && !weights.arranged_weight_scales().empty())
      p.w_scale_arranged = weights.arranged_weight_scales().data();
    if (!on_cuda && !weights.arranged_weight_scales_f16().empty())
      p.w_scale_arranged_f16 = weights.arranged_weight_scales_f16().data();
  } else {
    if (!args.w_scale.defined())
      check.fail("w_scale", "is required: these weights carry no scales (pack them with weight_scale, or pass w_scale)");
    check.tensor(args.w_scale, "w_scale", {DType::float32});
    check.scale_strides(args.w_scale, "w_scale", p.n, "output channel (row of the weights)", groups,
                  p.w_scale_stride_n, p.w_scale_stride_g);
    check.positive_finite(args.w_scale, "w_scale");
    p.w_scale = args.w_scale.ptr<const float>();
  }
  if (args.bias.defined()) {
    check.tensor(args.bias, "bias", {DType::float32}, 1);
    check.dim_equals(args.bias, "bias", 0, p.n, "N, one value per output channel");
    check.finite(args.bias, "bias");
    p.bias = args.bias.ptr<const float>();
  }
  if (args.residual.defined()) {
    if (on_cuda)
      check.tensor(args.residual, "residual", {DType::float32, DType::bfloat16, DType::float16}, 2);
    else
      check.tensor(args.residual, "residual", {DType::float32, DType::bfloat16}, 2);
    if (args.residual.size(0) != p.m || args.residual.size(1) != p.n)
      check.fail("residual", "must have shape [M, N] = [" + std::to_string(p.m) + ", " + std::to_string(p.n) + "], got " +
                                 args.residual.shape_string());
    p.residual = args.residual.data;
    p.residual_dtype = args.residual.dtype;
  }
  if (on_cuda)
    check.tensor(args.out, "out", {DType::float32, DType::bfloat16, DType::float16}, 2);
  else
    check.tensor(args.out, "out", {DType::float32, DType::bfloat16}, 2);
  if (args.out.size(0) != p.m || args.out.size(1) != p.n)
    check.fail("out", "must have shape [M, N] = [" + std::to_string(p.m) + ", " + std::to_string(p.n) + "], got " +
                          args.out.shape_string());
  p.out = args.out.data;
  p.out_dtype = args.out.dtype;
  p.activation = args.activation;
  dispatch(p, args.stream);
}

void gemm_accumulate(const TensorView& a, ActivationFormat a_format, const PackedWeights& weights, const TensorView& out,
                     std::uintptr_t stream) {
  const detail::Checker check = checker_for("gemm_accumulate", weights);
  detail::GemmProblem p;
  check_activations(check, a, a_format, weights, p);
  check.tensor(out, "out", {DType::int32}, 2);
  if (out.size(0) != p.m || out.size(1) != p.n)
    check.fail("out", "must have shape [M, N] = [" + std::to_string(p.m) + ", " + std::to_string(p.n) + "], got " +
                          out.shape_string());
  p.out_accumulators = out.ptr<std::int32_t>();
  dispatch(p, stream);
}

}  // namespace osengine
