"""A linear layer that runs on the engine (real int8 / int4 arithmetic).

EngineLinear keeps only what inference needs: the packed weights (one backend layout, packed once), the weight
scales, the bias (which carries the folded OS+ shift W z) and the activation quantizer's parameters. Per call it
quantizes the input with the fused shift/scale kernel and runs the GEMM with the fused epilogue.

Per-call cost matters at decode (a 30-layer model runs ~210 linears per token at a few tokens each): on the CPU with
float32 input, `forward` hands the extension numpy views prepared once (no argument conversion, no DLPack export), and
linears that read the same input (q/k/v, gate/up: the architecture's migration sites) can share one fused layer
(a FusedGroup, runtime/fusion.py): one activation quantization and one GEMM over the concatenated weights, each member
returning its columns. Every output column is computed exactly as by the member alone (same codes, same epilogue).
A Prologue folds the work of the module before the layer (an RMSNorm, a SiLU gate) into the quantize kernel.
An online input rotation (`input_rotation="hadamard"`, QuaRot: x H / sqrt(K) before the shift, the weight holding
W H / sqrt(K)) runs inside the quantize kernel too (rotate=True), after the prologue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .. import _C
from ..engine import ops
from ..quant.hadamard import hadamard_transform
from ..quant.layers import EngineConversionError  # (also re-exported: raised by the conversion)
from ..quant.spec import symmetric_weight_codes


@dataclass(frozen=True)
class Prologue:
    """What the layer's activation quantization computes from its input before quantizing (on the CPU fast path
    inside the quantize kernel, in torch otherwise):
    rms_norm   (weight [K], eps) of an RMSNorm the input still needs (the norm module then passes its input through)
    silu_gate  the input is [gate | up] (2K columns) and the layer quantizes silu(gate) * up"""
    rms_norm: Optional[tuple] = None
    silu_gate: bool = False


class EngineLinear(nn.Module):
    """y = x W^T + b computed as int GEMM: activations quantized per call (static or dynamic per token), weights
    symmetric int8 / int4 (per channel or per group) packed once. Inputs: float32 or bfloat16 [..., K]."""

    def __init__(self, weight_codes: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor], *,
                 weight_bits: int, weight_group_size: int = 0, act_bits: int = 8, act_symmetric: bool = False,
                 act_dynamic: bool = True, act_group_size: int = 0, act_scale: Optional[torch.Tensor] = None,
                 act_zero_point: Optional[torch.Tensor] = None, input_shift: Optional[torch.Tensor] = None,
                 input_smooth_scale: Optional[torch.Tensor] = None, backend: str = "auto",
                 input_rotation: Optional[str] = None):
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
        if input_rotation not in (None, "hadamard"):
            raise EngineConversionError(f"EngineLinear: input_rotation must be None or 'hadamard' (the online rotation "
                                        f"the engine runs), got {input_rotation!r}")
        if input_rotation is not None and not ops.is_hadamard_order(self.in_features):
            raise EngineConversionError(f"EngineLinear: input_rotation 'hadamard' needs K = m * 2^k with m = 1 or a "
                                        f"Paley order <= 256; the layer has K = {self.in_features} inputs")
        self.input_rotation = input_rotation
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
        # Benchmark switch: subtract the runtime shift in a separate elementwise pass instead of in the quantize kernel.
        self.separate_shift = False
        self.prologue = Prologue()
        # Set by FusedGroup.__init__ (join_group): the group whose fused layer computes this one's output columns
        # [lo, hi) (outside the module tree, so it is neither a child nor in the state dict); the layer's own packed
        # weights are then released.
        self.group = None
        self.columns = (0, self.out_features)
        self._fast = None   # numpy views of the per-call constants (CPU float32 fast path), made on first use

    def set_prologue(self, prologue: "Prologue") -> None:
        self.prologue = prologue
        self._fast = None

    def set_separate_shift(self, separate: bool) -> None:
        """Benchmark switch: subtract the runtime shift in its own elementwise pass (True) or in the kernel."""
        self.separate_shift = separate
        self._fast = None

    def join_group(self, group, columns: tuple) -> None:
        """Become a member of `group` (a FusedGroup), which computes this layer's output columns [lo, hi)."""
        object.__setattr__(self, "group", group)  # a plain attribute: the group is no part of the module tree
        self.columns = columns
        self.packed = None
        self._fast = None

    @classmethod
    def from_float(cls, linear: nn.Linear, *, weight_bits: int = 8, weight_group_size: int = 0, **act_options):
        """Quantize a float nn.Linear's weights (symmetric MinMax per channel, or per group) and wrap them."""
        granularity = "per-group" if weight_group_size else "per-channel"
        codes, w_scale, _ = symmetric_weight_codes(linear.weight.detach().float(), weight_bits, granularity,
                                                   weight_group_size)
        return cls(codes, w_scale, linear.bias, weight_bits=weight_bits, weight_group_size=weight_group_size,
                   **act_options)

    def weight_codes(self) -> torch.Tensor:
        """The int8 weight codes [out, in], recovered from the packed layout (the fused layer's, when fused)."""
        out = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        if self.group is None:
            self.packed.unpack(out)
        else:
            lo, hi = self.columns
            self.group.layer.packed.unpack_rows(torch.arange(lo, hi, dtype=torch.int32), out)
        return out

    @property
    def packed_nbytes(self) -> int:
        """Bytes of this layer's own packed weights (0 when they live in a fused layer)."""
        return 0 if self.packed is None else int(self.packed.nbytes)

    def _apply(self, fn, *args, **kwargs):
        self._fast = None  # buffers may be replaced (to / cuda / float): rebuild the numpy views on next use
        if self.group is not None:
            self.group.layer._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def _prepare_fast(self):
        """The per-call constants as numpy views (or False where the fast path does not apply: CUDA weights)."""
        if self.packed is None or self.packed.backend == "cuda" or any(
                t is not None and t.device.type != "cpu" for t in self.buffers()):
            self._fast = False
            return False
        def view(t):
            return (None if t is None else t.detach().numpy())
        shift = None if self.separate_shift else view(self.input_shift)
        rms_norm = self.prologue.rms_norm
        norm = (None, 1e-6) if rms_norm is None else (view(rms_norm[0].float()), rms_norm[1])
        self._fast = (view(self.w_scale), view(self.bias), view(self.act_scale),
                      None if self.act_symmetric else view(self.act_zero_point), shift, view(self.input_smooth_scale),
                      self.input_shift if self.separate_shift else None, norm, self.prologue.silu_gate,
                      self.input_rotation is not None)
        return self._fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            return self.group.output(x, self)
        return self._compute(x)

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast
        if fast is None:
            fast = self._prepare_fast()
        if fast and x.dtype == torch.float32 and not x.is_cuda:
            return self._forward_cpu(x, fast)
        return self._forward_generic(x)

    def _forward_cpu(self, x: torch.Tensor, fast) -> torch.Tensor:
        """CPU float32: numpy views in, prepared constants; the same ops (hence the same floats) as the generic path."""
        (w_scale, bias, act_scale, act_zero_point, shift, smooth_scale, separate, (norm, eps), gate, rotate) = fast
        shape = x.shape
        k, n = self.in_features, self.out_features
        x2 = (x.detach() if x.requires_grad else x).reshape(-1, 2 * k if gate else k)
        if separate is not None:
            if norm is not None:
                x2, norm = self._normalize(x2), None
            if gate:
                x2, gate = self._gate(x2), False
            if rotate:  # the rotation comes before the shift
                x2, rotate = self._rotate(x2), False
            x2 = x2 - separate  # the elementwise pass that the fused kernel saves
        elif not x2.is_contiguous():
            x2 = x2.contiguous()
        xn = x2.numpy()
        m = xn.shape[0]
        codes = np.empty((m, k), dtype=np.int8)
        if self.act_dynamic:
            groups = k // self.act_group_size if self.act_group_size else 1
            param_shape = (m, groups) if groups > 1 else (m,)
            a_scale = np.empty(param_shape, dtype=np.float32)
            a_zero_point = np.empty(param_shape, dtype=np.int32)
            _C.quantize_dynamic(xn, shift, smooth_scale, codes, a_scale, a_zero_point, self.act_bits,
                                self.act_symmetric, self.act_group_size, "auto", 0, norm, eps, gate, rotate)
            if self.act_symmetric:
                a_zero_point = None
        else:
            _C.quantize_static(xn, shift, smooth_scale, act_scale, act_zero_point, codes, self.act_bits,
                               self.act_symmetric, self.act_group_size, "auto", 0, norm, eps, gate, rotate)
            a_scale, a_zero_point = act_scale, act_zero_point
        # 4-bit codes stay int8: the CPU W4 kernel widens packed int4 activations to int8 anyway (see the runtime)
        y = torch.empty((m, n), dtype=torch.float32)
        _C.gemm(codes, self.packed, a_scale, w_scale, y.numpy(), a_zero_point, bias, None, "none", "int8", 0)
        return y.view(*shape[:-1], n)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The folded RMSNorm in torch, as LLaMA's: weight * (x * rsqrt(mean(x^2) + eps)), computed in fp32."""
        weight, eps = self.prologue.rms_norm
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (weight.float() * y).to(x.dtype)

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        """The folded SiLU gate in torch: silu(gate) * up of x = [gate | up]."""
        gate, up = x[..., :self.in_features], x[..., self.in_features:]
        return torch.nn.functional.silu(gate) * up

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The online rotation in torch (the separate-shift benchmark switch: it must come before the shift), in the
        kernels' float32 operation order."""
        return hadamard_transform(x).to(x.dtype)

    def _forward_generic(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.prologue.silu_gate:
            x = self._gate(x)
            shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.prologue.rms_norm is not None:
            x2 = self._normalize(x2)
        # The CUDA kernels read and write float16 themselves (no conversion passes around each linear of an fp16
        # model); the CPU kernels take float32 or bfloat16.
        if x2.dtype not in (torch.float32, torch.bfloat16) and not (x2.is_cuda and x2.dtype == torch.float16):
            x2 = x2.float()
        shift = self.input_shift
        rotate = self.input_rotation is not None
        if self.separate_shift and shift is not None:
            if rotate:
                x2, rotate = self._rotate(x2), False
            x2, shift = x2 - shift.to(x2.dtype), None
        x2 = x2.contiguous()
        q = ops.quantize(x2, bits=self.act_bits, symmetric=self.act_symmetric, shift=shift,
                         smooth_scale=self.input_smooth_scale, group_size=self.act_group_size,
                         scale=None if self.act_dynamic else self.act_scale,
                         zero_point=None if self.act_dynamic else self.act_zero_point, rotate=rotate)
        out_dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(x2.dtype, "float32")
        zero_point = None if self.act_symmetric else q.zero_point
        # 4-bit codes: CUDA's int4 kernels take them packed two per byte, the CPU's as int8 (see _forward_cpu)
        if self.act_bits <= 4 and self.packed.backend == "cuda":
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
                + (f"rotation={self.input_rotation}, " if self.input_rotation else "")
                + (f"fused: columns {self.columns[0]}..{self.columns[1]} of {self.group.layer.out_features}, "
                   f"backend={self.group.layer.packed.backend}" if self.group is not None else
                   f"backend={self.packed.backend}"))


