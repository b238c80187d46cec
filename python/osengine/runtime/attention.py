"""The native runtime's RoPE and attention inside a transformers model of the LLaMA family: one definition of both
(cpp/runtime/attention.cpp, what the runtime's Context computes), so that the engine-backed model and the
integer-exact simulation compute exactly the runtime's floats there. torch's attention and RoPE tables are an ulp or
so away from the runtime's, and on a static W8A8 model an ulp now and then flips an activation code at a rounding
boundary, after which the logits of the two drift apart by up to a few percent (docs/runtime.md)."""
from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn as nn

from .. import _C
from ..plugins.api import PluginError
from ..plugins.registry import resolve_architecture

ATTENTION_NAME = "osengine_runtime"


def _rope_theta(config) -> tuple[float, str]:
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), parameters.get("rope_type", parameters.get("type", "default"))


def _causal_keep(attention_mask: torch.Tensor, t: int, s: int) -> bool:
    """Whether a transformers attention mask [b, 1, t, s] (bool keep, or additive float) is the plain causal one."""
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    causal = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    return bool((keep == causal).all())


def runtime_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function (AttentionInterface): query [b, heads, t, d], key / value [b, kv_heads, s, d]
    -> [b, t, heads, d], computed by _C.runtime_causal_attention batch row by batch row."""
    b, heads, t, d = query.shape
    s = key.shape[2]
    if dropout:
        raise ValueError("osengine runtime attention: no dropout (inference only)")
    if query.device.type != "cpu":
        raise ValueError(f"osengine runtime attention: runs on the CPU, got {query.device.type} tensors")
    if scaling is not None and abs(scaling - d ** -0.5) > 1e-9 * d ** -0.5:
        raise ValueError(f"osengine runtime attention: the runtime scales by 1/sqrt(head_dim); this model asks "
                         f"{scaling}")
    if attention_mask is not None and not _causal_keep(attention_mask, t, s):
        raise ValueError("osengine runtime attention: only the plain causal mask (no padding); run sequences of one "
                         "length, unpadded")
    out = torch.empty(b, t, heads, d, dtype=torch.float32)
    for i in range(b):
        q = query[i].detach().transpose(0, 1).float().contiguous().numpy()
        k = key[i].detach().transpose(0, 1).float().contiguous().numpy()
        v = value[i].detach().transpose(0, 1).float().contiguous().numpy()
        out[i] = torch.from_numpy(_C.runtime_causal_attention(q, k, v))
    return out.to(query.dtype), None


def _runtime_rope_forward(theta: float, head_dim: int):
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        rows = []
        for positions in position_ids.detach().cpu().numpy().astype(np.int32):
            cos, sin = _C.runtime_rope_tables(theta, head_dim, positions)
            rows.append((np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)))
        cos = torch.from_numpy(np.stack([c for c, _ in rows])).to(device=x.device, dtype=x.dtype)
        sin = torch.from_numpy(np.stack([s for _, s in rows])).to(device=x.device, dtype=x.dtype)
        return cos, sin
    return forward


def use_runtime_attention(model: nn.Module) -> bool:
    """Make a CPU transformers model whose architecture plugin says `runtime_attention` (the LLaMA family) compute
    RoPE and attention as the native runtime does (in place): the rotary embedding returns the runtime's cos / sin
    tables and attention runs the runtime's kernel. Returns False (model unchanged) for other architectures, RoPE
    variants the runtime does not implement, or a model off the CPU. transformers applies the tables as the runtime
    does (x c - rotate_half(x) s, each product rounded)."""
    config = model.config
    try:
        if not resolve_architecture(model).runtime_attention:
            return False
    except PluginError:
        return False
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        return False
    theta, rope_type = _rope_theta(config)
    if rope_type != "default" or float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        return False
    if any(p.device.type != "cpu" for p in model.parameters()):
        return False
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, runtime_attention)
    # the masks sdpa takes (None when plain causal): without one registered, transformers passes no mask at all and
    # padding would go unseen
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)
    rotary.forward = types.MethodType(_runtime_rope_forward(theta, int(head_dim)), rotary)
    return True
