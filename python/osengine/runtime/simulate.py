"""The integer-exact simulation's side of the engine's fused prologues: a fake-quant model given the RMSNorms and SiLU
gates that an engine model folds into its quantize kernels, computed in the kernels' arithmetic."""
from __future__ import annotations

import types

import torch
import torch.nn as nn

from ..quant.integer_exact import engine_rms_norm, engine_silu


class _EngineSiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return engine_silu(x).to(x.dtype)

def _engine_norm_forward(self, hidden_states):
    return engine_rms_norm(hidden_states, self.weight, self.variance_epsilon).to(hidden_states.dtype)

def simulate_folded_prologues(simulation: nn.Module, engine_model: nn.Module) -> int:
    """Give a fake-quant model the prologues that `engine_model` (the same model after convert_to_engine) folds into
    its quantize kernels, in the kernels' arithmetic (osengine.quant.integer_exact): each folded RMSNorm computes
    engine_rms_norm, each MLP whose SiLU gate is folded uses engine_silu. With osengine.quant.layers.set_integer_exact on its
    linears, `simulation` then computes the engine model's floats exactly. Returns the number of modules changed."""
    count = 0
    for name, module in engine_model.named_modules():
        if "_osengine_norm_reader" in module.__dict__:
            norm = simulation.get_submodule(name)
            norm.forward = types.MethodType(_engine_norm_forward, norm)
            count += 1
        if "_osengine_gate_reader" in module.__dict__:
            simulation.get_submodule(name).act_fn = _EngineSiLU()
            count += 1
    return count
