"""Quantization primitives: the spec of a quantizer, step sizes and zero points from ranges, fake quantization
(simulated integer arithmetic in floating point) of weights and activations, and symmetric integer weight codes.

Integer ranges follow the paper: symmetric codes in [-(2^(b-1)-1), 2^(b-1)-1], asymmetric codes in [0, 2^b - 1].
Static symmetric activations can instead use the full signed range [-2^(b-1), 2^(b-1)-1] (`full_range`), with the
same step: what int8 runtimes (vLLM, compressed-tensors) compute, so that an exported model agrees with ours.
A fake-quantized tensor is dequant(quant(x)) = (clamp(round(x / delta) + zp, qmin, qmax) - zp) * delta.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

GRANULARITIES = ("per-tensor", "per-channel", "per-token", "per-group")
OBSERVERS = ("minmax", "avgminmax", "quantile", "search")   # static activations
WEIGHT_OBSERVERS = ("minmax", "mse")               # weights
WEIGHT_ROUNDINGS = ("nearest", "gptq")             # weights: round to nearest, or GPTQ (gptq.py)
WEIGHT_SCALE_DTYPES = ("float32", "float16")       # weights: the precision of their step sizes
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
    # Weights only: "float16" rounds each step size to the nearest float16 (where that is a normal float16) before the
    # codes are chosen, as llama.cpp's blocks store theirs: the engine then keeps the scales of int4 groups in half
    # the bytes, exactly (a decode step reads 1/8 instead of 1/4 of a byte of scale per weight in groups of 32).
    scale_dtype: str = "float32"

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
    if spec.scale_dtype == "float16":
        delta = float16_steps(delta)
    elif spec.scale_dtype != "float32":
        raise ValueError(f"weights: scale_dtype {spec.scale_dtype!r} is not one of {list(WEIGHT_SCALE_DTYPES)}")
    return x, delta, zp


def float16_steps(delta: torch.Tensor) -> torch.Tensor:
    """Step sizes rounded to the nearest float16 where they are normal float16 numbers (others unchanged). The
    relative change is at most 2^-11, so a row's (group's) largest weight still rounds to +-qmax, and
    symmetric_weight_codes recovers exactly these steps from the fake-quantized weights (qmax * step is exact)."""
    normal = (delta >= 2.0 ** -14) & (delta <= 65504.0)
    return torch.where(normal, delta.to(torch.float16).to(delta.dtype), delta)


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


def symmetric_weight_codes(w: torch.Tensor, bits: int, granularity: str = "per-channel", group_size: int = 0) -> tuple:
    """Symmetric MinMax integer codes of a [out, in] weight: (int8 codes in [-(2^(b-1)-1), 2^(b-1)-1], scales [out]
    (per channel), [out, in / group_size] (per group) or [1] (per tensor), group size or 0). The one definition of
    weight codes: the engine packs them, the integer-exact simulation and the exports read them back from
    fake-quantized weights (whose largest magnitude per row / group sits exactly on +-qmax)."""
    qmax = 2 ** (bits - 1) - 1
    if granularity == "per-group":
        grouped = w.reshape(w.shape[0], -1, group_size)
        scale = (grouped.abs().amax(dim=-1) / qmax).clamp(min=1e-8)
        codes = torch.round(grouped / scale[..., None]).reshape_as(w)
    elif granularity == "per-channel":
        scale = (w.abs().amax(dim=1) / qmax).clamp(min=1e-8)
        codes, group_size = torch.round(w / scale[:, None]), 0
    elif granularity == "per-tensor":
        scale = (w.abs().amax() / qmax).clamp(min=1e-8).reshape(1)
        codes, group_size = torch.round(w / scale), 0
    else:
        raise ValueError(f"weights: granularity {granularity!r} is not one of per-tensor, per-channel, per-group")
    return codes.clamp(-qmax, qmax).to(torch.int8), scale.float(), group_size
