"""Linear layers that run on the engine (real int8 / int4 arithmetic), and the swap from fake-quant layers.

EngineLinear keeps only what inference needs: the packed weights (one backend layout, packed once), the weight
scales, the bias (which carries the folded OS+ shift W z) and the activation quantizer's parameters. Per call it
quantizes the input with the fused shift/scale kernel and runs the GEMM with the fused epilogue.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import ops


class EngineLinear(nn.Module):
    """y = x W^T + b computed as int GEMM: activations quantized per call (static or dynamic per token), weights
    symmetric int8 / int4 (per channel or per group) packed once. Inputs: float32 or bfloat16 [..., K]."""

    def __init__(self, weight_codes: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor], *,
                 weight_bits: int, weight_group_size: int = 0, act_bits: int = 8, act_symmetric: bool = False,
                 act_dynamic: bool = True, act_group_size: int = 0, act_scale: Optional[torch.Tensor] = None,
                 act_zero_point: Optional[torch.Tensor] = None, input_shift: Optional[torch.Tensor] = None,
                 input_smooth_scale: Optional[torch.Tensor] = None, backend: str = "auto"):
        super().__init__()
        if weight_codes.dtype != torch.int8 or weight_codes.dim() != 2:
            raise TypeError(f"EngineLinear: weight_codes must be int8 [out, in], got {weight_codes.dtype} "
                            f"{list(weight_codes.shape)}")
        if weight_bits not in (4, 8):
            raise ValueError(f"EngineLinear: weight_bits must be 8 or 4, got {weight_bits}")
        if act_bits <= 4 and weight_bits != 4:
            raise ValueError("EngineLinear: int4 activations need int4 weights (W4A4)")
        if not act_dynamic and act_scale is None:
            raise ValueError("EngineLinear: static activation quantization needs act_scale")
        self.out_features, self.in_features = weight_codes.shape
        self.weight_bits, self.weight_group_size = weight_bits, weight_group_size
        self.act_bits, self.act_symmetric, self.act_dynamic = act_bits, act_symmetric, act_dynamic
        self.act_group_size = act_group_size
        codes = weight_codes.contiguous()
        self.packed = ops.pack_weights(codes if weight_bits == 8 else ops.pack_int4(codes), bits=weight_bits,
                                       group_size=weight_group_size, backend=backend)
        self.register_buffer("w_scale", w_scale.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.register_buffer("act_scale", None if act_scale is None else act_scale.detach().float().reshape(-1))
        self.register_buffer("act_zero_point",
                             None if act_zero_point is None else act_zero_point.detach().to(torch.int32).reshape(-1))
        self.register_buffer("input_shift", None if input_shift is None else input_shift.detach().float().contiguous())
        self.register_buffer("input_smooth_scale",
                             None if input_smooth_scale is None else input_smooth_scale.detach().float().contiguous())

    @classmethod
    def from_float(cls, linear: nn.Linear, *, weight_bits: int = 8, weight_group_size: int = 0, **act_options):
        """Quantize a float nn.Linear's weights (symmetric MinMax per channel, or per group) and wrap them."""
        codes, w_scale = quantize_weight_symmetric(linear.weight.detach().float(), weight_bits, weight_group_size)
        return cls(codes, w_scale, linear.bias, weight_bits=weight_bits, weight_group_size=weight_group_size,
                   **act_options)

    def weight_codes(self) -> torch.Tensor:
        """The int8 weight codes [out, in], recovered from the packed layout."""
        out = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        self.packed.unpack(out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        x2 = x2.contiguous()
        q = ops.quantize(x2, bits=self.act_bits, symmetric=self.act_symmetric, shift=self.input_shift,
                         smooth_scale=self.input_smooth_scale, group_size=self.act_group_size,
                         scale=None if self.act_dynamic else self.act_scale,
                         zero_point=None if self.act_dynamic else self.act_zero_point)
        out_dtype = "bfloat16" if x2.dtype == torch.bfloat16 else "float32"
        zero_point = None if self.act_symmetric else q.zero_point
        if self.act_bits <= 4:
            y = ops.gemm_w4a4(ops.pack_int4(q.codes), self.packed, a_scale=q.scale, a_zero_point=zero_point,
                              w_scale=self.w_scale, bias=self.bias, out_dtype=out_dtype)
        else:
            y = ops.gemm(q.codes, self.packed, a_scale=q.scale, a_zero_point=zero_point, w_scale=self.w_scale,
                         bias=self.bias, out_dtype=out_dtype)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        act = "dynamic per-token" if self.act_dynamic else "static per-tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, W{self.weight_bits}A{self.act_bits}"
                f" ({act}, {'symmetric' if self.act_symmetric else 'asymmetric'}), "
                f"group_size={self.weight_group_size}, shift={'yes' if self.input_shift is not None else 'no'}, "
                f"backend={self.packed.backend}")


def quantize_weight_symmetric(weight: torch.Tensor, bits: int, group_size: int = 0):
    """MinMax symmetric quantization of [out, in] weights: (int8 codes in [-(2^(b-1)-1), 2^(b-1)-1], scales [out] or
    [out, in / group_size])."""
    qmax = 2 ** (bits - 1) - 1
    if group_size:
        grouped = weight.reshape(weight.shape[0], -1, group_size)
        scale = (grouped.abs().amax(dim=-1) / qmax).clamp(min=1e-8)
        codes = torch.round(grouped / scale[..., None]).clamp(-qmax, qmax).reshape_as(weight)
    else:
        scale = (weight.abs().amax(dim=1) / qmax).clamp(min=1e-8)
        codes = torch.round(weight / scale[:, None]).clamp(-qmax, qmax)
    return codes.to(torch.int8), scale.float()
