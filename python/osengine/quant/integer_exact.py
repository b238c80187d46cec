"""The engine's CPU arithmetic in torch, float for float: what lets a simulation give the engine's exact bits.

The engine accumulates integer products exactly and rounds in a fixed order (cpp/src/backends/reference/*.cpp, mirrored
operation by operation by the AVX2 kernels); the floating-point fake quant (dequantize, then F.linear) and torch's own
RMSNorm and SiLU round differently, by an ulp here and there. That is harmless for accuracy, but a model quantized
statically with massive activations is chaotic at the ulp level (one flipped code changes the next layer's codes), so
comparing a whole engine model with a simulation token for token needs the same floats. These functions give them:

  integer_exact_linear   the GEMM epilogue: y = bias; y = fma(float(acc_g), a_scale * w_scale_g, y) per weight group
  engine_rms_norm        the RMSNorm folded into the quantize kernel: 8 interleaved fma partial sums
  engine_silu            the quantize kernel's SiLU: x / (1 + exp(-x)) with the engine's polynomial exp

Slow (float64 products, elementwise emulation of fma): for checks, not for speed.
"""
from __future__ import annotations

from typing import Optional

import torch


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fma(a, b, c) of float32 values rounded once to float32, as the hardware's fused multiply-add.

    a * b is exact in float64 (24 + 24 significant bits); the sum is rounded to float64 with round-to-odd (TwoSum
    gives the exact rounding error; an inexact even result moves to its odd neighbour on the error's side), and
    rounding that to float32 is then correct, because float64 keeps more than 2 * 24 + 1 bits."""
    p = a.double() * b.double()
    c = c.double()
    s = p + c
    s_minus_p = s - p
    err = (p - (s - s_minus_p)) + (c - s_minus_p)
    inexact_even = (err != 0) & ((s.view(torch.int64) & 1) == 0)
    if bool(inexact_even.any()):
        toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
        s = torch.where(inexact_even, torch.nextafter(s, toward), s)
    return s.float()


def integer_exact_linear(codes: torch.Tensor, delta: torch.Tensor, weight_codes: torch.Tensor,
                         weight_scale: torch.Tensor, weight_group_size: int,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The engine's GEMM with its epilogue: exact integer accumulation per weight group, then
    y = bias; y = fma(float(acc_g), a_scale * w_scale_g, y) for each group g in order.

    codes [M, K] centred activation codes (code - zero point, integers in a float tensor); delta [M, 1] or
    [M, K / group] their step sizes; weight_codes [N, K] int8; weight_scale [N], [1] or [N, K / group]."""
    m, k = codes.shape
    n = weight_codes.shape[0]
    group = weight_group_size or k
    a, w = codes.double(), weight_codes.double()
    w_scale = weight_scale.float().reshape(-1, 1) if weight_scale.dim() == 1 else weight_scale.float()
    y = (bias.float() if bias is not None else torch.zeros(n, device=codes.device)).expand(m, n)
    for g in range(k // group):
        cols = slice(g * group, (g + 1) * group)
        acc = a[:, cols] @ w[:, cols].T   # integers below 2^53: exact in float64 in any summation order
        a_scale = delta[:, g if delta.shape[1] > 1 else 0].float()
        scale = a_scale[:, None] * w_scale[:, g if w_scale.shape[1] > 1 else 0][None, :]  # one float32 product
        y = fma32(acc.float(), scale, y)
    return y


def engine_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * r), r = 1 / sqrt(sum(x^2) / K + eps) over the last dimension, the sum as the quantize kernel
    takes it: partial l accumulates x_i^2 for i = l mod 8 with fma, then ((p0 + p4) + (p2 + p6)) +
    ((p1 + p5) + (p3 + p7))."""
    shape, k = x.shape, x.shape[-1]
    rows = x.float().reshape(-1, k)
    pad = (-k) % 8
    lanes = torch.nn.functional.pad(rows, (0, pad)).reshape(rows.shape[0], -1, 8)  # padding adds fma(0, 0, p) = p
    partial = torch.zeros(rows.shape[0], 8, device=rows.device)
    for j in range(lanes.shape[1]):
        partial = fma32(lanes[:, j], lanes[:, j], partial)
    p = partial.unbind(-1)
    total = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))
    mean = total / torch.full_like(total, float(k))   # tensor operands: a true float32 division
    # torch's float32 sqrt is not always correctly rounded; float64's is, and rounding it to float32 then is too
    root = torch.sqrt((mean + torch.tensor(eps, dtype=torch.float32)).double()).float()
    r = torch.ones_like(mean) / root
    return (weight.float() * (rows * r[:, None])).reshape(shape)


_F32 = torch.float32


def _c(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=_F32)


# exp_approx's constants (cpp/src/core/float_math.hpp), each rounded to float32 as the C++ compiler does
_EXP_LO, _EXP_HI, _LOG2E = _c(-87.3), _c(88.7), _c(1.44269504088896341)
_LN2_HI, _LN2_LO = _c(0.693359375), _c(-2.12194440e-4)
_EXP_POLY = [_c(1.0) / _c(d) for d in (5040.0, 720.0, 120.0, 24.0, 6.0)] + [_c(0.5), _c(1.0), _c(1.0)]


def engine_exp(x: torch.Tensor) -> torch.Tensor:
    """exp_approx: x = n ln2 + r, a degree-7 polynomial in r by fma (Horner), times 2^n built from its bits."""
    x = torch.clamp(x.float(), _EXP_LO, _EXP_HI)
    n = torch.round(x * _LOG2E)
    r = fma32(n, -_LN2_HI, x)
    r = fma32(n, -_LN2_LO, r)
    p = _EXP_POLY[0].expand_as(r)
    for coefficient in _EXP_POLY[1:]:
        p = fma32(p, r, coefficient)
    two_to_n = ((n.to(torch.int32) + 127) << 23).view(_F32)
    return p * two_to_n


def engine_silu(x: torch.Tensor) -> torch.Tensor:
    """silu_approx: x / (1 + exp_approx(-x))."""
    x = x.float()
    return x / (_c(1.0) + engine_exp(-x))
