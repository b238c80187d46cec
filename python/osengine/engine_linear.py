"""Linear layers that run on the engine (real int8 / int4 arithmetic), and the swap from fake-quant layers.

EngineLinear keeps only what inference needs: the packed weights (one backend layout, packed once), the weight
scales, the bias (which carries the folded OS+ shift W z) and the activation quantizer's parameters. Per call it
quantizes the input with the fused shift/scale kernel and runs the GEMM with the fused epilogue.

Per-call cost matters at decode (a 30-layer model runs ~210 linears per token at a few tokens each): on the CPU with
float32 input, `forward` hands the extension numpy views prepared once (no argument conversion, no DLPack export), and
linears that read the same input (q/k/v, gate/up: the architecture's migration sites) can share one fused layer
(`convert_to_engine(fuse=True)`): one activation quantization and one GEMM over the concatenated weights, each member
returning its columns. Every output column is computed exactly as by the member alone (same codes, same epilogue).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from . import _C, ops
from .quantizers import weight_codes_from_fake_quant


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
        # Benchmark switch: subtract the runtime shift in a separate elementwise pass instead of in the quantize kernel.
        self.separate_shift = False
        # Set by fuse_linears: the fused layer that computes this one's output columns [lo, hi) (outside the module
        # tree, so it is neither a child nor in the state dict), and this layer's own packed weights are released.
        self._fused: Optional["EngineLinear"] = None
        self._fused_columns = (0, self.out_features)
        self._cache = None  # fused layer: (input, input version, output, members served)
        # (weight [K], eps) of an RMSNorm that the input still needs (engine_model.fold_norm_into_quantizer): applied
        # inside the quantize kernel on the CPU fast path, in torch otherwise.
        self.pre_norm = None
        # True when the input is [gate | up] of 2 * in_features columns and the layer quantizes silu(gate) * up
        # (engine_model.fold_gate_into_down_proj): inside the quantize kernel on the CPU fast path, in torch otherwise.
        self.pre_gate = False
        self._fast = None   # numpy views of the per-call constants (CPU float32 fast path), made on first use

    @classmethod
    def from_float(cls, linear: nn.Linear, *, weight_bits: int = 8, weight_group_size: int = 0, **act_options):
        """Quantize a float nn.Linear's weights (symmetric MinMax per channel, or per group) and wrap them."""
        codes, w_scale = quantize_weight_symmetric(linear.weight.detach().float(), weight_bits, weight_group_size)
        return cls(codes, w_scale, linear.bias, weight_bits=weight_bits, weight_group_size=weight_group_size,
                   **act_options)

    def weight_codes(self) -> torch.Tensor:
        """The int8 weight codes [out, in], recovered from the packed layout (the fused layer's, when fused)."""
        out = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        if self._fused is None:
            self.packed.unpack(out)
        else:
            lo, hi = self._fused_columns
            self._fused.packed.unpack_rows(torch.arange(lo, hi, dtype=torch.int32), out)
        return out

    @property
    def packed_nbytes(self) -> int:
        """Bytes of this layer's own packed weights (0 when they live in a fused layer)."""
        return 0 if self.packed is None else int(self.packed.nbytes)

    def _apply(self, fn, *args, **kwargs):
        self._fast = None  # buffers may be replaced (to / cuda / float): rebuild the numpy views on next use
        if self._fused is not None:
            self._fused._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def _prepare_fast(self):
        """The per-call constants as numpy views (or False where the fast path does not apply: CUDA weights)."""
        if self.packed is None or self.packed.backend == "cuda" or any(
                t is not None and t.device.type != "cpu" for t in self.buffers()):
            self._fast = False
            return False
        view = (lambda t: None if t is None else t.detach().numpy())
        shift = None if self.separate_shift else view(self.input_shift)
        norm = (None, 1e-6) if self.pre_norm is None else (view(self.pre_norm[0].float()), self.pre_norm[1])
        self._fast = (view(self.w_scale), view(self.bias), view(self.act_scale),
                      None if self.act_symmetric else view(self.act_zero_point), shift, view(self.input_smooth_scale),
                      "int4_packed" if self.act_bits <= 4 else "int8",
                      self.input_shift if self.separate_shift else None, norm, self.pre_gate)
        return self._fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            return self._fused._shared_output(x, self)
        return self._compute(x)

    def _shared_output(self, x: torch.Tensor, member: "EngineLinear") -> torch.Tensor:
        """Fused layer: member's columns of the output for input x; computed once per input tensor (identity and
        in-place version checked where torch keeps one: not for inference-mode tensors) for all members."""
        cache = self._cache
        if cache is None or cache[0] is not x or member in cache[3] or (
                cache[1] is not None and cache[1] != x._version):
            version = None if x.is_inference() else x._version  # inference tensors keep no version counter
            cache = self._cache = (x, version, self._compute(x), [])
        cache[3].append(member)
        if len(cache[3]) >= self._n_members:
            self._cache = None  # every member served: release the input and the output
        lo, hi = member._fused_columns
        return cache[2][..., lo:hi]

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast
        if fast is None:
            fast = self._prepare_fast()
        if fast and x.dtype == torch.float32 and not x.is_cuda:
            return self._forward_cpu(x, fast)
        return self._forward_generic(x)

    def _forward_cpu(self, x: torch.Tensor, fast) -> torch.Tensor:
        """CPU float32: numpy views in, prepared constants; the same ops (hence the same floats) as the generic path."""
        w_scale, bias, act_scale, act_zero_point, shift, smooth_scale, a_format, separate, (norm, eps), gate = fast
        shape = x.shape
        k, n = self.in_features, self.out_features
        x2 = (x.detach() if x.requires_grad else x).reshape(-1, 2 * k if gate else k)
        if separate is not None:
            if norm is not None:
                x2, norm = self._normalize(x2), None
            if gate:
                x2, gate = self._gate(x2), False
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
                                self.act_symmetric, self.act_group_size, "auto", 0, norm, eps, gate)
            if self.act_symmetric:
                a_zero_point = None
        else:
            _C.quantize_static(xn, shift, smooth_scale, act_scale, act_zero_point, codes, self.act_bits,
                               self.act_symmetric, self.act_group_size, "auto", 0, norm, eps, gate)
            a_scale, a_zero_point = act_scale, act_zero_point
        if a_format == "int4_packed":
            packed_codes = np.empty((m, k // 2), dtype=np.uint8)
            _C.pack_int4(codes, packed_codes)
            codes = packed_codes
        y = torch.empty((m, n), dtype=torch.float32)
        _C.gemm(codes, self.packed, a_scale, w_scale, y.numpy(), a_zero_point, bias, None, "none", a_format, 0)
        return y.view(*shape[:-1], n)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The folded RMSNorm in torch, as LLaMA's: weight * (x * rsqrt(mean(x^2) + eps)), computed in fp32."""
        weight, eps = self.pre_norm
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (weight.float() * y).to(x.dtype)

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        """The folded SiLU gate in torch: silu(gate) * up of x = [gate | up]."""
        gate, up = x[..., :self.in_features], x[..., self.in_features:]
        return torch.nn.functional.silu(gate) * up

    def _forward_generic(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.pre_gate:
            x = self._gate(x)
            shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.pre_norm is not None:
            x2 = self._normalize(x2)
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        shift = self.input_shift
        if self.separate_shift and shift is not None:
            x2, shift = x2 - shift.to(x2.dtype), None
        x2 = x2.contiguous()
        q = ops.quantize(x2, bits=self.act_bits, symmetric=self.act_symmetric, shift=shift,
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
                + (f"fused: columns {self._fused_columns[0]}..{self._fused_columns[1]} of {self._fused.out_features}, "
                   f"backend={self._fused.packed.backend}" if self._fused is not None else
                   f"backend={self.packed.backend}"))


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


class EngineConversionError(ValueError):
    """A fake-quantized layer whose quantization the engine cannot execute as is."""


def static_act_qparams_from_fake_quant(name: str, layer, value_range: Optional[tuple] = None) -> tuple:
    """(scale [1] float32, zero point [1] int32 for signed codes in [-2^(b-1), 2^(b-1) - 1]) of a calibrated static
    per-tensor activation quantizer; `value_range` (lo, hi) replaces the calibrated range. Also used by the
    compressed-tensors export (osengine.export)."""
    from .quantizers import qparams_from_range

    aspec = layer.act_quant.spec
    lo, hi = value_range if value_range is not None else (layer.act_quant.lo, layer.act_quant.hi)
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise EngineConversionError(f"{name}: the static activation quantizer was never calibrated")
    delta, zp = qparams_from_range(lo.float(), hi.float(), aspec)
    # fake quant stores asymmetric codes in [0, 2^b - 1]; the engine in [-2^(b-1), 2^(b-1) - 1]: same quantizer
    offset = 0 if aspec.symmetric else 2 ** (aspec.bits - 1)
    return delta.reshape(1), (zp.reshape(1) - offset).to(torch.int32)


def engine_linear_from_fake_quant(name: str, layer, backend: str = "auto") -> EngineLinear:
    """The EngineLinear that computes what a calibrated FakeQuantLinear simulates."""
    wspec, aspec = layer.weight_spec, layer.act_quant.spec
    if not wspec.symmetric:
        raise EngineConversionError(
            f"{name}: the engine runs symmetric weights only (its epilogue corrects activation zero points, not "
            f"weight zero points); this recipe quantizes weights asymmetrically")
    if aspec.granularity == "per-tensor" and aspec.dynamic:
        raise EngineConversionError(f"{name}: dynamic per-tensor activations are not supported by the engine; use "
                                    f"static per-tensor or dynamic per-token")
    if aspec.granularity == "per-channel":
        raise EngineConversionError(f"{name}: per-channel activation quantization cannot be used by an int GEMM")
    codes, w_scale, w_group = weight_codes_from_fake_quant(layer)
    weight_bits = 4 if wspec.bits <= 4 else 8
    act_group = aspec.group_size if aspec.granularity == "per-group" else 0
    if act_group and act_group != w_group:
        raise EngineConversionError(f"{name}: per-group activations (group {act_group}) need weights with the same "
                                    f"group size (weights use {w_group or 'none'})")
    act_scale = act_zero_point = None
    if not aspec.dynamic:
        act_scale, act_zero_point = static_act_qparams_from_fake_quant(name, layer)
    # Full-range symmetric codes (down to -2^(b-1)) are the engine's asymmetric codes with zero point 0.
    act_symmetric = aspec.symmetric and not aspec.full_range
    return EngineLinear(codes, w_scale, layer.bias, weight_bits=weight_bits, weight_group_size=w_group,
                        act_bits=aspec.bits, act_symmetric=act_symmetric, act_dynamic=aspec.dynamic,
                        act_group_size=act_group, act_scale=act_scale, act_zero_point=act_zero_point,
                        input_shift=layer.input_shift, backend=backend)


def convert_to_engine(model: nn.Module, backend: str = "auto", *, fuse: bool = True,
                      quantize_embeddings: bool = False) -> nn.Module:
    """Swap every calibrated FakeQuantLinear of a quantized model for an EngineLinear (in place): the model then runs
    its quantized linears with real int arithmetic. Layers kept in floating point stay as they are.

    fuse                 linears that read the same input with the same activation quantizer (q/k/v, gate/up) share
                         one quantization and one GEMM (the outputs are the same; fewer, larger calls)
    quantize_embeddings  also store the token embedding table in int8 (one scale per row; a lookup dequantizes only
                         the rows it gathers) and run lm_head on the engine (int8 per-channel weights, activations int8
                         per token, dynamic); a tied lm_head and embedding share one int8 copy. Not part of the
                         recipe's simulation (the recipe keeps them in floating point), so off by default: see
                         docs/deployment.md for what it costs in accuracy.
    """
    from .quantizers import FakeQuantLinear

    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, FakeQuantLinear) and m.weight_spec is not None and m.act_quant is not None]
    if not targets:
        raise EngineConversionError("convert_to_engine: the model has no quantized linear layers; quantize it first")
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, engine_linear_from_fake_quant(name, layer, backend))
    from . import engine_model

    if fuse:
        engine_model.fuse_shared_inputs(model)
    if quantize_embeddings:
        engine_model.quantize_embeddings(model, backend=backend)
    return model
