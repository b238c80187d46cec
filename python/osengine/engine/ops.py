"""The engine's ops for Python: numpy arrays and torch tensors in, the same kind out, never copied.

This is a thin layer over the private extension ``osengine._C``: it allocates outputs with the caller's array library
(numpy, or torch on the input's device), turns plain Python numbers into one-element arrays, and calls the C++ op,
which validates everything and raises ValueError / TypeError naming the bad argument.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import _C
from .._C import PackedWeights

__all__ = [
    "PackedWeights",
    "QuantizedActivations",
    "quantize",
    "hadamard_transform",
    "is_hadamard_order",
    "pack_weights",
    "gemm",
    "gemm_w4a4",
    "gemm_accumulate",
    "pack_int4",
    "unpack_int4",
    "column_sums",
    "code_range",
    "set_num_threads",
    "get_num_threads",
    "cpu_has_avx2",
    "cpu_has_avx512_vnni",
    "best_cpu_backend",
    "has_cuda_backend",
    "registered_backends",
]

code_range = _C.code_range
set_num_threads = _C.set_num_threads
get_num_threads = _C.get_num_threads
cpu_has_avx2 = _C.cpu_has_avx2
cpu_has_avx512_vnni = _C.cpu_has_avx512_vnni
best_cpu_backend = _C.best_cpu_backend
has_cuda_backend = _C.has_cuda_backend
registered_backends = _C.registered_backends
is_hadamard_order = _C.is_hadamard_order


class QuantizedActivations(NamedTuple):
    """int8 codes [M, K] and the step (``scale``) and ``zero_point`` they were quantized with:
    x ~= scale * (codes - zp)."""

    codes: Any
    scale: Any
    zero_point: Any


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def _detach(x: Any) -> Any:
    # DLPack refuses tensors that require grad; detaching shares the memory (no copy).
    if x is not None and _is_torch(x) and x.requires_grad:
        return x.detach()
    return x


def _empty(like: Any, shape: tuple, dtype: str) -> Any:
    """An uninitialised output of `dtype` allocated by the same library (and on the same device) as `like`."""
    if _is_torch(like):
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
    if dtype == "bfloat16":
        raise TypeError("osengine: bfloat16 output needs torch tensors (numpy has no bfloat16)")
    return np.empty(shape, dtype=dtype)


def _as_array(value: Any, dtype: str, like: Any) -> Any:
    """Python numbers (or sequences) become arrays of `dtype`; arrays and tensors pass through untouched."""
    if value is None or isinstance(value, np.ndarray) or _is_torch(value):
        return _detach(value)
    if _is_torch(like):
        import torch

        return torch.tensor(value, dtype=getattr(torch, dtype), device=like.device).reshape(-1)
    return np.asarray(value, dtype=dtype).reshape(-1)


def _stream(x: Any) -> int:
    """The current CUDA stream of a torch CUDA tensor's device (as an integer handle), else 0."""
    if _is_torch(x) and x.is_cuda:
        import torch

        return torch.cuda.current_stream(x.device).cuda_stream
    return 0


def _shape(x: Any, name: str, op: str) -> tuple:
    shape = tuple(x.shape)
    if len(shape) != 2:
        raise ValueError(f"osengine.{op}: argument '{name}': expected 2 dimensions [M, K], got shape {list(shape)}")
    return shape


def quantize(
    x: Any,
    *,
    bits: int = 8,
    symmetric: bool = True,
    shift: Any = None,
    smooth_scale: Any = None,
    scale: Any = None,
    zero_point: Any = None,
    group_size: int = 0,
    backend: str = "auto",
    rms_norm_weight: Any = None,
    rms_norm_eps: float = 1e-6,
    silu_gate: bool = False,
    rotate: bool = False,
) -> QuantizedActivations:
    """Quantize activations x [M, K] (float32 or bfloat16) with an optional fused OS+ shift and scale.

    codes = clamp(round(((x - shift) / smooth_scale) / scale) + zero_point) in the `bits`-bit range (int8 storage).
    Static when `scale` is given (one value, or one per group); otherwise dynamic per token (per row, or per row and
    group), and the computed scale and zero point are returned. With `rms_norm_weight` [K] (CPU), x is first
    normalized as by a LLaMA RMSNorm, rms_norm_weight * x / sqrt(mean(x^2) + rms_norm_eps), inside the same pass.
    With `silu_gate` (CPU), x is [gate | up] of shape [M, 2K] and silu(gate) * up [M, K] is quantized (a LLaMA MLP's
    down_proj input, never written out in fp32).
    With `rotate`, each row (after the norm or gate, before the shift and scale) is first rotated, x H_K / sqrt(K),
    with the Hadamard matrix of osengine.quant.hadamard and in its hadamard_transform's float32 operation order (the
    codes are those of quantizing hadamard_transform(x), bit for bit): QuaRot's online rotation, whose inverse the
    layer's weight holds. K must be m * 2^k with m = 1 or a Paley order <= 256 (is_hadamard_order); groups split the
    rotated row.
    """
    x = _detach(x)
    m, k = _shape(x, "x", "quantize")
    if silu_gate:
        if k % 2:
            raise ValueError(f"osengine.quantize: argument 'x': must hold [gate | up] (an even number of columns) "
                             f"with silu_gate, got shape {[m, k]}")
        k //= 2
    shift = _as_array(shift, "float32", x)
    smooth_scale = _as_array(smooth_scale, "float32", x)
    norm = _as_array(rms_norm_weight, "float32", x)
    codes = _empty(x, (m, k), "int8")
    if scale is not None:
        scale = _as_array(scale, "float32", x)
        zero_point = _as_array(zero_point, "int32", x)
        _C.quantize_static(x, shift, smooth_scale, scale, zero_point, codes, bits, symmetric, group_size, backend,
                           _stream(x), norm, rms_norm_eps, silu_gate, rotate)
        return QuantizedActivations(codes, scale, zero_point)
    if zero_point is not None:
        raise ValueError("osengine.quantize: argument 'zero_point': given without 'scale'; static quantization needs "
                         "both (dynamic quantization computes them)")
    groups = k // group_size if group_size and group_size > 0 and k % group_size == 0 else 1
    param_shape = (m, groups) if groups > 1 else (m,)
    out_scale = _empty(x, param_shape, "float32")
    out_zero_point = _empty(x, param_shape, "int32")
    _C.quantize_dynamic(x, shift, smooth_scale, codes, out_scale, out_zero_point, bits, symmetric, group_size, backend,
                        _stream(x), norm, rms_norm_eps, silu_gate, rotate)
    return QuantizedActivations(codes, out_scale, out_zero_point)


def hadamard_transform(x: Any) -> Any:
    """x H_K / sqrt(K) per row of float32 x [M, K] (CPU), computed by the engine in the order its quantize kernels
    follow with rotate=True (osengine.quant.hadamard.hadamard_transform gives the same floats); for cross-checks."""
    x = _detach(x)
    _shape(x, "x", "hadamard_transform")
    out = _empty(x, tuple(x.shape), "float32")
    _C.hadamard_transform(x, out)
    return out


def pack_weights(weights: Any, bits: int = 8, group_size: int = 0, backend: str = "auto",
                 weight_scale: Any = None) -> PackedWeights:
    """Pack quantized weights once, for the GEMMs: int8 codes [N, K] in [-127, 127] (bits=8), or int4 codes packed two
    per byte [N, K/2] (bits=4, see pack_int4). `group_size` enables per-group scales (it must divide K).

    `weight_scale` (optional: one value, [N] or [N, K/group_size]) makes the weights carry their scales: they are
    checked once, here, and gemm() is then called without `w_scale`."""
    if weight_scale is not None:
        weight_scale = _as_array(weight_scale, "float32", np.empty(0))
        if _is_torch(weight_scale):
            weight_scale = weight_scale.detach().cpu()
    return PackedWeights.pack(_detach(weights), bits, group_size, backend, weight_scale)


def _gemm(a, weights, a_format, a_scale, w_scale, a_zero_point, bias, residual, activation, out_dtype, out):
    a = _detach(a)
    m = _shape(a, "a", "gemm")[0]
    if not isinstance(weights, PackedWeights):
        raise TypeError(f"osengine.gemm: argument 'weights': expected PackedWeights (from pack_weights), got "
                        f"{type(weights).__name__}")
    if out is None:
        out = _empty(a, (m, weights.n), out_dtype)
    _C.gemm(a, weights, _as_array(a_scale, "float32", a), _as_array(w_scale, "float32", a), out,
            _as_array(a_zero_point, "int32", a), _as_array(bias, "float32", a), _detach(residual), activation, a_format,
            _stream(a))
    return out


def gemm(
    a: Any,
    weights: PackedWeights,
    *,
    a_scale: Any,
    w_scale: Any = None,
    a_zero_point: Any = None,
    bias: Any = None,
    residual: Any = None,
    activation: str = "none",
    out_dtype: str = "float32",
    out: Any = None,
) -> Any:
    """W8A8 / W4A8 GEMM with the fused epilogue (int8 activation codes [M, K], weights packed with 8 or 4 bits):

    out = act(a_scale[m] * w_scale[n] * (A W^T - a_zero_point[m] * colsum_w[n]) + bias[n]) + residual[m, n]

    `bias` carries the folded OS+ shift W z. Scales: one value, per token [M] / per channel [N], or per group;
    `w_scale` is left out when the weights carry their scales (pack_weights(..., weight_scale=...)).
    `activation`: none, relu, gelu, gelu_tanh, silu. `out_dtype`: float32 or bfloat16 (torch inputs; float16 too on
    the CUDA backend).
    """
    return _gemm(a, weights, "int8", a_scale, w_scale, a_zero_point, bias, residual, activation, out_dtype, out)


def gemm_w4a4(
    a_packed: Any,
    weights: PackedWeights,
    *,
    a_scale: Any,
    w_scale: Any = None,
    a_zero_point: Any = None,
    bias: Any = None,
    residual: Any = None,
    activation: str = "none",
    out_dtype: str = "float32",
    out: Any = None,
) -> Any:
    """W4A4 GEMM: activations as int4 codes packed two per byte [M, K/2] (pack_int4), int4 weights; same epilogue."""
    return _gemm(a_packed, weights, "int4_packed", a_scale, w_scale, a_zero_point, bias, residual, activation,
                 out_dtype, out)


def gemm_accumulate(a: Any, weights: PackedWeights, *, a_format: str = "int8", out: Any = None) -> Any:
    """The raw int32 accumulators A W^T [M, N], without the epilogue (for tests and for measuring the epilogue)."""
    a = _detach(a)
    m = _shape(a, "a", "gemm_accumulate")[0]
    if out is None:
        out = _empty(a, (m, weights.n), "int32")
    _C.gemm_accumulate(a, weights, out, a_format, _stream(a))
    return out


def pack_int4(codes: Any) -> Any:
    """int8 codes in [-8, 7], last dimension even -> uint8 with two codes per byte (even index in the low nibble).

    A CUDA tensor is packed on its GPU with torch's elementwise ops (the engine has no CUDA kernel for it); its codes
    are not range-checked there, like the other value checks of CUDA data (reading them back would synchronize)."""
    codes = _detach(codes)
    if _is_torch(codes) and codes.is_cuda:
        return _pack_int4_torch(codes)
    out = _empty(codes, tuple(codes.shape[:-1]) + (codes.shape[-1] // 2,), "uint8")
    _C.pack_int4(codes, out)
    return out


def _pack_int4_torch(codes: Any) -> Any:
    """pack_int4 of a torch tensor with torch ops, on its device: the same bytes as the engine's packing."""
    import torch

    if codes.dtype != torch.int8:
        raise TypeError(f"osengine.pack_int4: argument 'codes': expected dtype int8, got {str(codes.dtype)[6:]}")
    if codes.ndim < 1 or codes.shape[-1] % 2:
        raise ValueError(f"osengine.pack_int4: argument 'codes': last dimension must be even to pack two int4 codes "
                         f"per byte, got {list(codes.shape)}")
    return ((codes[..., 0::2] & 15) | (codes[..., 1::2] << 4)).view(torch.uint8)


def unpack_int4(packed: Any) -> Any:
    """The inverse of pack_int4: uint8 [..., K/2] -> int8 [..., K]."""
    packed = _detach(packed)
    out = _empty(packed, tuple(packed.shape[:-1]) + (packed.shape[-1] * 2,), "int8")
    _C.unpack_int4(packed, out)
    return out


def column_sums(weights_int8: Any, group_size: int = 0) -> Any:
    """sum_k W[n, k] per group, int32 [num_groups, N]: the zero-point correction term."""
    weights_int8 = _detach(weights_int8)
    n, k = _shape(weights_int8, "weights", "column_sums")
    groups = k // group_size if group_size and group_size > 0 and k % group_size == 0 else 1
    out = _empty(weights_int8, (groups, n), "int32")
    _C.column_sums(weights_int8, group_size, out)
    return out
