"""The integer-exact simulation's side of the engine's fused prologues: a fake-quant model given the RMSNorms and SiLU
gates that an engine model folds into its quantize kernels, computed in the kernels' arithmetic."""
from __future__ import annotations

import types

import torch
import torch.nn as nn

from ..quant.integer_exact import engine_rms_norm, engine_silu
from .attention import ATTENTION_NAME, use_runtime_attention
from .fusion import GATE_ACTIVATION_TAG, GATE_READER_TAG, NORM_READER_TAG


class _EngineSiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return engine_silu(x).to(x.dtype)


def _engine_norm_forward(eps: float):
    def forward(self, hidden_states):
        return engine_rms_norm(hidden_states, self.weight, eps).to(hidden_states.dtype)
    return forward


def simulate_engine_norm(norm: nn.Module, eps: float) -> None:
    """Make an RMSNorm module compute in the engine's quantize-prologue arithmetic (engine_rms_norm): how the native
    runtime normalizes the input of a quantized lm_head (ModelOptions.quantize_embeddings)."""
    norm.forward = types.MethodType(_engine_norm_forward(eps), norm)


def simulate_folded_prologues(simulation: nn.Module, engine_model: nn.Module) -> int:
    """Give a fake-quant model the prologues that `engine_model` (the same model after convert_to_engine) folds into
    its quantize kernels, in the kernels' arithmetic (osengine.quant.integer_exact): each folded RMSNorm computes
    engine_rms_norm (with the epsilon the engine uses), each MLP whose SiLU gate is folded uses engine_silu as its
    activation; and, where convert_to_engine gave the engine model the native runtime's RoPE and attention
    (runtime.attention), the same to `simulation`. With osengine.quant.layers.set_integer_exact on its linears,
    `simulation` then computes the engine model's floats exactly. Returns the number of prologue modules changed."""
    if getattr(engine_model.config, "_attn_implementation", None) == ATTENTION_NAME:
        use_runtime_attention(simulation)
    count = 0
    for name, module in engine_model.named_modules():
        reader = module.__dict__.get(NORM_READER_TAG)
        if reader is not None:
            norm = simulation.get_submodule(name)
            norm.forward = types.MethodType(_engine_norm_forward(reader.prologue.rms_norm[1]), norm)
            count += 1
        if GATE_READER_TAG in module.__dict__:
            setattr(simulation.get_submodule(name), module.__dict__[GATE_ACTIVATION_TAG], _EngineSiLU())
            count += 1
    return count
