"""Fake-quantized modules: the quantized linear layer (and its block-level wrapping), BMM-input quantization through
transformers' attention interface, the residual restore of post-LN models, and the integer codes the engine and the
exports read back from a fake-quantized layer."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hadamard import check_supported, hadamard_transform
from .integer_exact import integer_exact_linear
from .observers import ActQuantizer
from .recipes import Recipe, RecipeError
from .spec import QuantSpec, qparams_from_range, quantize_weight, symmetric_weight_codes


class FakeQuantLinear(nn.Module):
    """A linear layer with fake-quantized weights and input. `input_shift` is the optional runtime shift z
    (x - z before quantization; the matching W z is already in the bias), what the engine fuses into its
    quantize kernel and GEMM epilogue. With no specs it is an exact floating-point nn.Linear.

    By default the product is dequant(x) @ dequant(W)^T in floating point, which rounds differently from the
    engine's integer accumulation. `set_integer_exact` switches a calibrated layer to `integer_exact_linear`, which
    computes the engine's floats exactly (slower: float64 products), so that a whole model can be compared with its
    engine-backed copy token for token."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("input_shift", None)
        self.input_rotation: Optional[str] = None   # "hadamard": x H / sqrt(K) before the shift (quant/hadamard.py)
        self.act_quant: Optional[ActQuantizer] = None
        self.weight_spec: Optional[QuantSpec] = None
        self.exact_weight: Optional[tuple] = None   # (codes, scales, group size) while integer-exact

    def quantize(self, weight_spec: QuantSpec, act_spec: QuantSpec, weight: Optional[torch.Tensor] = None) -> None:
        """Fake-quantize the weight (round to nearest, or take `weight`, already quantized on the spec's grid by
        GPTQ) and attach an activation quantizer."""
        with torch.no_grad():
            q = quantize_weight(self.weight.float(), weight_spec) if weight is None else weight
            self.weight.copy_(q.to(self.weight.dtype))
        self.weight_spec = weight_spec
        self.act_quant = ActQuantizer(act_spec).to(self.weight.device)
        self.exact_weight = None

    def set_input_rotation(self, kind: Optional[str]) -> None:
        """An online rotation of the input (the weight must already hold its inverse, W H / sqrt(K)): "hadamard"
        or None. The engine fuses it into its quantize kernel (QuantizeOptions.rotate)."""
        if kind not in (None, "hadamard"):
            raise ValueError(f"input_rotation must be None or 'hadamard', got {kind!r}")
        if kind is not None:
            check_supported(self.in_features, f"the online rotation of a linear with {self.in_features} inputs")
        self.input_rotation = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = hadamard_transform(x).to(x.dtype)
        if self.input_shift is not None:
            x = x - self.input_shift
        if self.exact_weight is not None and self.act_quant.mode == "quantize":
            prefix = min(self.act_quant.fp_prefix, x.shape[1]) if x.dim() == 3 else 0
            if prefix:  # the full-precision prefix: float activations times the (fake-)quantized weight
                return torch.cat([F.linear(x[:, :prefix], self.weight, self.bias), self._exact(x[:, prefix:])], dim=1)
            return self._exact(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.weight, self.bias)

    def _exact(self, x: torch.Tensor) -> torch.Tensor:
        codes, delta = self.act_quant.codes(x.float())
        shape = x.shape
        y = integer_exact_linear(codes.reshape(-1, shape[-1]), delta.reshape(-1, delta.shape[-1]),
                                 *self.exact_weight, self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_bits={self.weight_spec.bits if self.weight_spec else None}, "
                f"shift={'yes' if self.input_shift is not None else 'no'}"
                + (f", rotation={self.input_rotation}" if self.input_rotation else ""))


def wrap_linears(block: nn.Module) -> None:
    """Replace every nn.Linear in the block by an (initially exact, floating-point) FakeQuantLinear."""
    for name, m in list(block.named_modules()):
        if type(m) is nn.Linear:
            block.set_submodule(name, FakeQuantLinear(m))


def quantize_block(block: nn.Module, block_name: str, recipe: Recipe, weights: Optional[dict] = None) -> list:
    """Quantize the block's linears that the recipe does not keep in floating point; `weights` maps a linear's
    name (in the block) to its already quantized weight (GPTQ), used instead of rounding to nearest."""
    quantized = []
    for name, m in block.named_modules():
        if isinstance(m, FakeQuantLinear) and not recipe.keeps_fp(f"{block_name}.{name}"):
            activations = recipe.activation_spec(f"{block_name}.{name}")
            for spec, where in ((recipe.weights, "weights"), (activations, "activations")):
                if spec.granularity == "per-group" and m.in_features % spec.group_size:
                    raise RecipeError(f"recipe field '{where}.group_size' ({spec.group_size}) does not divide "
                                      f"the {m.in_features} input channels of {block_name}.{name}")
            m.quantize(recipe.weights, activations, weight=(weights or {}).get(name))
            quantized.append(name)
    return quantized


def weight_codes_from_fake_quant(layer) -> tuple:
    """Recover integer codes and scales from a fake-quantized weight (values code * delta): MinMax symmetric
    quantization maps each row's (or group's) largest magnitude to +-qmax (so do the mse observer, by clamping, and
    GPTQ, which pins that weight), so the codes are `symmetric_weight_codes` of the fake-quantized values. Symmetric
    weight specs only (callers check); returns (int8 codes [out, in], scales, group size or 0). Used by the engine
    conversion, the integer-exact simulation and the compressed-tensors export."""
    spec = layer.weight_spec
    return symmetric_weight_codes(layer.weight.detach().float(), spec.bits, spec.granularity, spec.group_size or 0)


class EngineConversionError(ValueError):
    """A fake-quantized layer whose quantization the engine (or an export format) cannot execute as is."""


def static_act_qparams_from_fake_quant(name: str, layer, value_range: Optional[tuple] = None) -> tuple:
    """(scale [1] float32, zero point [1] int32 for signed codes in [-2^(b-1), 2^(b-1) - 1]) of a calibrated static
    per-tensor activation quantizer; `value_range` (lo, hi) replaces the calibrated range. Also used by the
    compressed-tensors export (osengine.io.export)."""
    aspec = layer.act_quant.spec
    lo, hi = value_range if value_range is not None else (layer.act_quant.lo, layer.act_quant.hi)
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise EngineConversionError(f"{name}: the static activation quantizer was never calibrated")
    delta, zp = qparams_from_range(lo.float(), hi.float(), aspec)
    # fake quant stores asymmetric codes in [0, 2^b - 1]; the engine in [-2^(b-1), 2^(b-1) - 1]: same quantizer
    offset = 0 if aspec.symmetric else 2 ** (aspec.bits - 1)
    return delta.reshape(1), (zp.reshape(1) - offset).to(torch.int32)


def set_integer_exact(model: nn.Module, enabled: bool = True) -> int:
    """Make every calibrated FakeQuantLinear of `model` compute exactly the floats the engine computes
    (`integer_exact_linear`), or go back to the floating-point simulation; returns the number of layers switched.
    Symmetric weights only (what the engine runs); raises ValueError naming the first layer that has others."""
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, FakeQuantLinear) and m.weight_spec is not None and m.act_quant is not None]
    if enabled:
        for name, m in layers:
            if not m.weight_spec.symmetric:
                raise ValueError(f"set_integer_exact: layer {name} has asymmetric weights; the integer-exact "
                                 f"simulation follows the engine, which runs symmetric weights only")
            if m.act_quant.spec.granularity == "per-channel":
                raise ValueError(f"set_integer_exact: layer {name} quantizes its input per channel, which no int "
                                 f"GEMM can run")
    for _, m in layers:
        m.exact_weight = weight_codes_from_fake_quant(m) if enabled else None
    return len(layers)


class RMSNorm(nn.Module):
    """weight * (x * rsqrt(mean(x^2) + eps)) in float32: what a LayerNorm computes on zero-mean inputs, once its
    mean subtraction is folded into the layers that write the stream (rotated LayerNorm models:
    calibrate/rotation.py)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.variance_epsilon = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.float() * h).to(x.dtype)


class ResidualRestore(nn.Module):
    """Post-LN models: the residual branch must see the untransformed X = X' * s + z."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels))

    def forward(self, x):
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def _restore_residual_hook(module, args, kwargs):
    if len(args) >= 2:
        args = (args[0], module.osengine_residual(args[1])) + tuple(args[2:])
    else:
        kwargs = dict(kwargs, input_tensor=module.osengine_residual(kwargs["input_tensor"]))
    return args, kwargs


def install_residual_restore(module: nn.Module, channels: int) -> ResidualRestore:
    if not hasattr(module, "osengine_residual"):
        module.osengine_residual = ResidualRestore(channels).to(next(module.parameters()).device)
        module.register_forward_pre_hook(_restore_residual_hook, with_kwargs=True)
    return module.osengine_residual


# ---- BMM inputs (Q, K, V, softmax probabilities) through transformers' attention-function interface ----

BMM_ATTENTION_NAME = "osengine_fakequant_bmm"


class BmmQuantizers(nn.Module):
    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.query, self.key, self.value, self.probs = (ActQuantizer(spec) for _ in range(4))


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def fakequant_bmm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with fake-quantized BMM inputs; same contract as transformers' eager_attention_forward."""
    quant = getattr(module, "osengine_bmm", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if quant is not None:
        query, key, value = quant.query(query), quant.key(key), quant.value(value)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if quant is not None:
        probs = quant.probs(probs)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def install_bmm_quantization(model: nn.Module, attention_modules: list, spec: QuantSpec) -> None:
    """Quantize BMM inputs: attach quantizers to each attention module and route the model's attention through
    `fakequant_bmm_attention` (works for models that use transformers' AttentionInterface)."""
    from transformers import AttentionInterface

    AttentionInterface.register(BMM_ATTENTION_NAME, fakequant_bmm_attention)
    try:  # the masks must be built for it too (additive float masks, as for eager attention): without this,
        # transformers builds none for an unknown implementation and attention is neither causal nor padding-masked
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(BMM_ATTENTION_NAME, eager_mask)
    except ImportError:  # older transformers build masks by themselves
        pass
    for m in attention_modules:
        m.osengine_bmm = BmmQuantizers(spec)
    for cfg in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        cfg._attn_implementation = BMM_ATTENTION_NAME
