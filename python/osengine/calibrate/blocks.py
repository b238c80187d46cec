"""Running one transformer block on its captured inputs: block by block, each block is called with the (args,
kwargs) its predecessor's forward gave it, so the hidden states can be replaced by the quantized predecessor's."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..plugins.api import PluginError
from .data import CalibrationError


class _Stop(Exception):
    pass


def hidden_states(call):
    """The hidden states a captured block call carries."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def with_hidden_states(call, h):
    """The captured call with its hidden states replaced by h."""
    args, kwargs = call
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=h)


def run_block(block, call):
    """Run a block on one captured call (args, kwargs); its hidden-state output."""
    args, kwargs = call
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Sequence[dict]) -> list:
    """Run the model up to its first block and keep that block's call (args, kwargs) for every batch."""
    calls = []

    def hook(_m, args, kwargs):
        calls.append((args, kwargs))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(**b)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise PluginError("the architecture's first block was not called by the model's forward")
    return calls


def check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise CalibrationError(f"non-finite activations (NaN or inf) in {where}; check the calibration data and "
                               "the model's dtype")
