"""What an engine-backed model holds in memory, and the benchmark switch for the runtime shift."""
from __future__ import annotations

import torch.nn as nn

from .linear import EngineLinear


def _engine_layers(model: nn.Module):
    seen = set()
    for m in model.modules():
        if isinstance(m, EngineLinear):
            for layer in (m, None if m.group is None else m.group.layer):
                if layer is not None and id(layer) not in seen:
                    seen.add(id(layer))
                    yield layer


def model_memory(model: nn.Module) -> dict:
    """Bytes the model holds for inference: parameters and buffers (each storage once: tied tensors are shared),
    the engine's packed weights with their zero-point column sums, and the fused layers' own scales and biases.
    {"tensors": bytes, "packed": bytes, "total": bytes}."""
    seen, tensors = set(), 0
    in_tree = {id(m) for m in model.modules()}
    extra_buffers = [b for layer in _engine_layers(model) if id(layer) not in in_tree for b in layer.buffers()]
    for t in list(model.parameters()) + list(model.buffers()) + extra_buffers:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        tensors += t.untyped_storage().nbytes()
    packed = 0
    for layer in _engine_layers(model):
        if layer.packed is not None:
            packed += int(layer.packed.nbytes) + 4 * layer.packed.n * layer.packed.num_groups
    return {"tensors": tensors, "packed": packed, "total": tensors + packed}


def set_shift_mode(model: nn.Module, mode: str) -> int:
    """"fused" (default: the runtime OS+ shift is subtracted inside the quantize kernel) or "separate" (an elementwise
    x - z pass first; for measuring what the fusion saves). Returns how many shifted layers were switched."""
    if mode not in ("fused", "separate"):
        raise ValueError(f"set_shift_mode: mode must be 'fused' or 'separate', got {mode!r}")
    count = 0
    for layer in _engine_layers(model):
        layer.set_separate_shift(mode == "separate")
        count += layer.input_shift is not None and layer.packed is not None
    return count
