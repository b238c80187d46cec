"""From a calibrated fake-quant model to an engine-backed one: each FakeQuantLinear becomes the EngineLinear that
computes what it simulates; then shared-input linears are fused and, on request, the embeddings go to int8."""
from __future__ import annotations

import torch.nn as nn

from ..quant.layers import (
    EngineConversionError,
    FakeQuantLinear,
    static_act_qparams_from_fake_quant,
    weight_codes_from_fake_quant,
)
from .attention import use_runtime_attention
from .embedding import quantize_embeddings as quantize_int8_embeddings
from .fusion import fuse_shared_inputs
from .linear import EngineLinear


def engine_linear_from_fake_quant(name: str, layer, backend: str = "auto") -> EngineLinear:
    """The EngineLinear that computes what a calibrated FakeQuantLinear simulates (with its online input rotation,
    if it has one: the quantize kernel rotates, rotate=True)."""
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
    try:   # EngineLinear checks what the engine can run (the rotation, among others); say which layer failed
        return EngineLinear(codes, w_scale, layer.bias, weight_bits=weight_bits, weight_group_size=w_group,
                            act_bits=aspec.bits, act_symmetric=act_symmetric, act_dynamic=aspec.dynamic,
                            act_group_size=act_group, act_scale=act_scale, act_zero_point=act_zero_point,
                            input_shift=layer.input_shift, backend=backend,
                            input_rotation=getattr(layer, "input_rotation", None))
    except EngineConversionError as e:
        raise EngineConversionError(f"{name}: {e}") from None


def convert_to_engine(model: nn.Module, backend: str = "auto", *, fuse: bool = True,
                      quantize_embeddings: bool = False) -> nn.Module:
    """Swap every calibrated FakeQuantLinear of a quantized model for an EngineLinear (in place): the model then runs
    its quantized linears with real int arithmetic. Layers kept in floating point stay as they are. A model quantized
    behind a prefix keeps its stored prefix keys and values (calibrate/prefix.run_after_prefix runs it behind them).

    fuse                 linears that read the same input with the same activation quantizer (q/k/v, gate/up) share
                         one quantization and one GEMM (the outputs are the same; fewer, larger calls)
    quantize_embeddings  also store the token embedding table in int8 (one scale per row; a lookup dequantizes only
                         the rows it gathers) and run lm_head on the engine (int8 per-channel weights, activations int8
                         per token, dynamic); a tied lm_head and embedding share one int8 copy. Not part of the
                         recipe's simulation (the recipe keeps them in floating point), so off by default: see
                         docs/deployment.md for what it costs in accuracy.
    On the CPU, a LLaMA-family model also computes RoPE and attention with the native runtime's kernels
    (runtime.attention.use_runtime_attention), so that it and the runtime agree bit for bit.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, FakeQuantLinear) and m.weight_spec is not None and m.act_quant is not None]
    if not targets:
        raise EngineConversionError("convert_to_engine: the model has no quantized linear layers; quantize it first")
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, engine_linear_from_fake_quant(name, layer, backend))
    if fuse:
        fuse_shared_inputs(model)
    if quantize_embeddings:
        quantize_int8_embeddings(model, backend=backend)
    use_runtime_attention(model)  # CPU LLaMA family: RoPE and attention as the native runtime computes them
    return model
