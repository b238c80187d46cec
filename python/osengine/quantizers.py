"""Fake quantization (simulated integer arithmetic in floating point): specs, observers, quantized linear layers.

Integer ranges follow the paper: symmetric codes in [-(2^(b-1)-1), 2^(b-1)-1], asymmetric codes in [0, 2^b - 1].
Static symmetric activations can instead use the full signed range [-2^(b-1), 2^(b-1)-1] (`full_range`), with the
same step: what int8 runtimes (vLLM, compressed-tensors) compute, so that an exported model agrees with ours.
A fake-quantized tensor is dequant(quant(x)) = (clamp(round(x / delta) + zp, qmin, qmax) - zp) * delta.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .engine_arithmetic import integer_exact_linear

GRANULARITIES = ("per-tensor", "per-channel", "per-token", "per-group")
OBSERVERS = ("minmax", "avgminmax", "quantile", "search")   # static activations
# Activation "search" observer (token-wise clipping searched by output error, the coarse stage of Outlier Suppression
# v1): candidate ranges are these quantiles of the per-token minima and maxima seen during calibration (1.0 = MinMax);
# the calibration driver keeps the candidate that gives the least squared error of the block's output.
CLIP_SEARCH_QUANTILES = (1.0, 0.9999, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8)
WEIGHT_OBSERVERS = ("minmax", "mse")               # weights
WEIGHT_ROUNDINGS = ("nearest", "gptq")             # weights: round to nearest, or GPTQ (gptq.py)
# Weight "mse" observer: each row's (or group's) MinMax range shrunk by the factor of this grid that gives the least
# squared error of the fake-quantized row; 1.0 first, so that a row where clipping does not help keeps its MinMax.
MSE_SHRINK_GRID = tuple(1.0 - 0.02 * i for i in range(25))  # 1.00, 0.98, ..., 0.52


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor (weights, activations, BMM inputs) is quantized."""
    bits: int = 8
    symmetric: bool = True
    granularity: str = "per-tensor"
    group_size: Optional[int] = None
    dynamic: bool = False            # activations only: ranges computed per call instead of calibrated
    observer: str = "minmax"         # static activations: minmax / avgminmax / quantile / search; weights: minmax / mse
    quantile: float = 0.995          # for observer == "quantile"
    # Symmetric activations: codes down to -2^(b-1) (int8 runtimes' clamp) instead of -(2^(b-1)-1); the step is
    # still max|x| / (2^(b-1)-1), so only values beyond the calibrated range quantize differently.
    full_range: bool = False
    # Weights only: "nearest" rounds every weight to its nearest code (the paper's MinMax quantizer); "gptq" chooses
    # the codes on the same grid by GPTQ from the layer's calibration inputs (gptq.py; done by the calibration driver).
    rounding: str = "nearest"

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) if self.full_range else -(2 ** (self.bits - 1) - 1)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def to_dict(self) -> dict:
        return asdict(self)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Step size and zero point for the range [lo, hi] (tensors broadcastable against the data)."""
    if spec.symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        delta = (absmax / spec.qmax).clamp(min=1e-8)
        return delta, torch.zeros_like(delta)
    # Asymmetric ranges always contain 0 so that zero (padding, ReLU zeros) is represented exactly.
    lo = lo.clamp(max=0)
    hi = hi.clamp(min=0)
    delta = ((hi - lo) / spec.qmax).clamp(min=1e-8)
    zero_point = torch.round(-lo / delta).clamp(spec.qmin, spec.qmax)
    return delta, zero_point


def centred_codes(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """clamp(round(x / delta) + zp, qmin, qmax) - zp: the integer an int GEMM multiplies (as a float tensor)."""
    return torch.clamp(torch.round(x / delta) + zero_point, spec.qmin, spec.qmax) - zero_point


def fake_quant(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return centred_codes(x, delta, zero_point, spec) * delta


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.shape[-1] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the channel count {x.shape[-1]}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def _mse_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, dims) -> tuple:
    """The range [r lo, r hi], r from MSE_SHRINK_GRID, with the least squared error of fake_quant(x) summed over
    `dims` (the dimensions lo and hi were reduced over), chosen independently for each row or group."""
    best_err, best_lo, best_hi = None, lo, hi
    for r in MSE_SHRINK_GRID:
        delta, zp = qparams_from_range(lo * r, hi * r, spec)
        err = (fake_quant(x, delta, zp, spec) - x).square().sum(dim=dims, keepdim=True)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo * r, best_lo), torch.where(better, hi * r, best_hi)
    return best_lo, best_hi


def weight_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple:
    """(w viewed as its quantization units, delta, zero point) for a [out, in] weight: per-tensor, per output
    channel, or per group along `in` ([out, groups, group_size]); the range is MinMax, or with observer "mse" the
    MinMax range shrunk where that lowers the squared error (clipping). delta and zero point broadcast against the
    view."""
    if spec.granularity == "per-tensor":
        x, dims = w, (0, 1)
    elif spec.granularity == "per-channel":
        x, dims = w, (1,)
    elif spec.granularity == "per-group":
        x, dims = _grouped(w, spec.group_size), (-1,)
    else:
        raise ValueError(f"weights: granularity {spec.granularity!r} is not one of per-tensor, per-channel, per-group")
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    if spec.observer == "mse":
        lo, hi = _mse_range(x, lo, hi, spec, dims)
    elif spec.observer != "minmax":
        raise ValueError(f"weights: observer {spec.observer!r} is not one of {list(WEIGHT_OBSERVERS)}")
    delta, zp = qparams_from_range(lo, hi, spec)
    return x, delta, zp


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest weight quantization of a [out, in] matrix on the grid of `weight_qparams`."""
    x, delta, zp = weight_qparams(w, spec)
    return fake_quant(x, delta, zp, spec).reshape_as(w)


def dynamic_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple:
    """(x, or x viewed as [..., groups, group_size] for per-group, delta, zero point) with ranges taken from x itself
    (per tensor, per token, or per token and group)."""
    if spec.granularity == "per-tensor":
        lo, hi = x.min(), x.max()
    elif spec.granularity == "per-token":
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    elif spec.granularity == "per-group":
        x = _grouped(x, spec.group_size)
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        raise ValueError(f"activations: granularity {spec.granularity!r} cannot be dynamic")
    delta, zp = qparams_from_range(lo, hi, spec)
    return x, delta, zp


def quantize_dynamic(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Activation quantization with ranges taken from x itself (per tensor, per token, or per token and group)."""
    xg, delta, zp = dynamic_qparams(x, spec)
    return fake_quant(xg, delta, zp, spec).reshape_as(x)


def quantize_with_range(x: torch.Tensor, lo: float, hi: float, spec: QuantSpec) -> torch.Tensor:
    """Per-tensor quantization with a given range (used by the scale search, which sets the range to (-t, t))."""
    lo_t = torch.tensor(lo, dtype=x.dtype, device=x.device)
    hi_t = torch.tensor(hi, dtype=x.dtype, device=x.device)
    delta, zp = qparams_from_range(lo_t, hi_t, spec)
    return fake_quant(x, delta, zp, spec)


class ActQuantizer(nn.Module):
    """Activation fake-quantizer. Static specs observe calibration batches first (mode "observe"), then quantize with
    the frozen range; dynamic specs compute ranges per call. Per-tensor static only (what an int GEMM can use)."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.mode = "quantize" if spec.dynamic else "observe"
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("batches", torch.tensor(0))
        self.token_mask: Optional[torch.Tensor] = None   # [batch, tokens] real tokens of the batch being observed
        self.token_extremes: list = []   # observer "search": (per-token minima, maxima) of each observed batch

    def _real_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Drop padding tokens before observing: x is [batch, tokens, channels] (linear inputs) or
        [batch, heads, tokens, dim] (BMM inputs)."""
        m = self.token_mask
        if m is None:
            return x
        m = m.to(x.device)
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
            return x[m]
        if x.dim() == 4 and x.shape[0] == m.shape[0] and x.shape[2] == m.shape[1]:
            return x.transpose(1, 2)[m]
        return x

    def _observe(self, x: torch.Tensor) -> None:
        x = self._real_tokens(x.detach()).float()
        if self.spec.observer == "search":  # MinMax now; the token extremes feed clip_candidates()
            flat = x.reshape(-1, x.shape[-1])
            self.token_extremes.append((flat.amin(dim=-1).cpu(), flat.amax(dim=-1).cpu()))
        if self.spec.observer == "quantile":
            # token-wise clipping: quantile of per-token extremes, averaged over batches
            flat = x.reshape(-1, x.shape[-1])
            lo = torch.quantile(flat.amin(dim=-1), 1 - self.spec.quantile)
            hi = torch.quantile(flat.amax(dim=-1), self.spec.quantile)
        else:
            lo, hi = x.min(), x.max()
        if self.spec.observer in ("minmax", "search"):
            self.lo.copy_(torch.minimum(self.lo, lo))
            self.hi.copy_(torch.maximum(self.hi, hi))
        else:  # running average of per-batch ranges; each batch is counted exactly once
            n = self.batches.item()
            if n == 0:
                self.lo.copy_(lo)
                self.hi.copy_(hi)
            else:
                self.lo.copy_((self.lo * n + lo) / (n + 1))
                self.hi.copy_((self.hi * n + hi) / (n + 1))
        self.batches += 1

    def clip_candidates(self) -> list:
        """Observer "search": [(quantile, lo, hi)] from the per-token extremes observed, widest (MinMax) first,
        without repeats."""
        if not self.token_extremes:
            raise RuntimeError("clip_candidates() needs calibration batches observed with observer 'search'")
        mins = torch.cat([lo for lo, _ in self.token_extremes])
        maxs = torch.cat([hi for _, hi in self.token_extremes])
        out, seen = [], set()
        for q in CLIP_SEARCH_QUANTILES:
            lo = float(torch.quantile(mins, 1.0 - q)) if q < 1.0 else float(mins.min())
            hi = float(torch.quantile(maxs, q)) if q < 1.0 else float(maxs.max())
            if (lo, hi) not in seen:
                seen.add((lo, hi))
                out.append((q, lo, hi))
        return out

    def set_range(self, lo: float, hi: float) -> None:
        self.lo.fill_(lo)
        self.hi.fill_(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.spec.dynamic:
            return quantize_dynamic(x, self.spec)
        if self.mode == "observe":
            self._observe(x)
            return x
        delta, zp = self._static_qparams(x.dtype)
        return fake_quant(x, delta, zp, self.spec)

    def _static_qparams(self, dtype: torch.dtype) -> tuple:
        if not torch.isfinite(self.lo) or not torch.isfinite(self.hi):
            raise RuntimeError("static activation quantizer used before calibration (no finite range observed)")
        return qparams_from_range(self.lo.to(dtype), self.hi.to(dtype), self.spec)

    def codes(self, x: torch.Tensor) -> tuple:
        """(centred integer codes [..., K] as a float tensor, step sizes [..., 1] (per tensor / token) or
        [..., K / group_size] (per group)) of x, what forward() dequantizes: forward(x) == codes * delta."""
        if self.spec.dynamic:
            xg, delta, zp = dynamic_qparams(x, self.spec)
            q = centred_codes(xg, delta, zp, self.spec)
            if self.spec.granularity == "per-group":
                return q.reshape_as(x), delta.squeeze(-1)
            return q, delta.expand(*x.shape[:-1], 1)
        delta, zp = self._static_qparams(x.dtype)
        return centred_codes(x, delta, zp, self.spec), delta.expand(*x.shape[:-1], 1)

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={s.bits}, symmetric={s.symmetric}, {s.granularity}, dynamic={s.dynamic}, mode={self.mode}"


def weight_codes_from_fake_quant(layer) -> tuple:
    """Recover integer codes and scales from a fake-quantized weight (values code * delta): MinMax symmetric
    quantization maps each row's (or group's) largest magnitude to +-qmax (so do the mse observer, by clamping, and
    GPTQ, which pins that weight), so delta = max|w| / qmax. Symmetric weight
    specs only (callers check); returns (int8 codes [out, in], scales, group size or 0). Used by the engine
    conversion, the integer-exact simulation and the compressed-tensors export."""
    spec = layer.weight_spec
    w = layer.weight.detach().float()
    qmax = 2 ** (spec.bits - 1) - 1
    if spec.granularity == "per-group":
        grouped = w.reshape(w.shape[0], -1, spec.group_size)
        scale = (grouped.abs().amax(dim=-1) / qmax).clamp(min=1e-8)
        codes = torch.round(grouped / scale[..., None]).reshape_as(w)
        group_size = spec.group_size
    elif spec.granularity == "per-channel":
        scale = (w.abs().amax(dim=1) / qmax).clamp(min=1e-8)
        codes = torch.round(w / scale[:, None])
        group_size = 0
    else:  # per-tensor
        scale = (w.abs().amax() / qmax).clamp(min=1e-8).reshape(1)
        codes = torch.round(w / scale)
        group_size = 0
    return codes.clamp(-qmax, qmax).to(torch.int8), scale, group_size


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shift is not None:
            x = x - self.input_shift
        if self.exact_weight is not None and self.act_quant.mode == "quantize":
            codes, delta = self.act_quant.codes(x.float())
            shape = x.shape
            y = integer_exact_linear(codes.reshape(-1, shape[-1]), delta.reshape(-1, delta.shape[-1]),
                                     *self.exact_weight, self.bias)
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_bits={self.weight_spec.bits if self.weight_spec else None}, "
                f"shift={'yes' if self.input_shift is not None else 'no'}")


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


def set_observing(module: nn.Module, observing: bool) -> None:
    """Switch every static activation quantizer under `module` between observing and quantizing."""
    for m in module.modules():
        if isinstance(m, ActQuantizer) and not m.spec.dynamic:
            m.mode = "observe" if observing else "quantize"
