"""Folding: the equivalent transformation X' = (X - z) / s of a migration site, exact in floating point.

The producer absorbs 1/s (and -z/s where it has a bias), the consumers' weights absorb s (columns) and their biases
W z; a runtime shift instead stays on the consumers (x - z before quantization, W z in the bias: the engine's fused
shift-add); post-LN models get a residual restore X' * s + z.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..plugins.api import Migration, MigrationSite, PluginError
from ..quant.layers import FakeQuantLinear, install_residual_restore


def apply_migration(model: nn.Module, site: MigrationSite, migration: Migration) -> None:
    """Fold X' = (X - z) / s into the producer and compensate in the consumers (exact in floating point)."""
    producer = model.get_submodule(site.producer)
    consumers = [model.get_submodule(n) for n in site.consumers]
    ref = consumers[0].weight
    channels = consumers[0].in_features
    s = migration.scale
    s = torch.ones(channels, dtype=torch.float32, device=ref.device) if s is None else s.float().to(ref.device)
    z = None if migration.shift is None else migration.shift.float().to(ref.device)
    folded_z = z if (z is not None and not migration.runtime_shift) else None
    if s.shape != (channels,) or (z is not None and z.shape != (channels,)):
        raise PluginError(f"site {site.name}: shift/scale must have shape ({channels},)")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise PluginError(f"site {site.name}: scales must be finite and positive")
    if folded_z is not None and not (site.producer_kind == "layernorm" and getattr(producer, "bias", None) is not None):
        raise PluginError(f"site {site.name}: a shift cannot be folded into {site.producer_kind} "
                          f"{site.producer}; use a runtime shift")
    if migration.runtime_shift and not all(isinstance(c, FakeQuantLinear) for c in consumers):
        raise PluginError(f"site {site.name}: a runtime shift needs FakeQuantLinear consumers")
    with torch.no_grad():
        if site.producer_kind in ("layernorm", "rmsnorm"):
            if folded_z is not None:
                producer.bias.copy_(((producer.bias.float() - folded_z) / s).to(producer.bias.dtype))
            elif getattr(producer, "bias", None) is not None:
                producer.bias.copy_((producer.bias.float() / s).to(producer.bias.dtype))
            producer.weight.copy_((producer.weight.float() / s).to(producer.weight.dtype))
        else:  # linear_rows
            producer.weight.copy_((producer.weight.float() / s[:, None]).to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.copy_((producer.bias.float() / s).to(producer.bias.dtype))
        for c in consumers:
            w = c.weight.float()
            if z is not None:
                b = w @ z if c.bias is None else c.bias.float() + w @ z
                c.bias = nn.Parameter(b.to(c.weight.dtype), requires_grad=c.weight.requires_grad)
            c.weight.copy_((w * s).to(c.weight.dtype))
            if migration.runtime_shift:
                c.input_shift = (z / s).to(c.weight.dtype)
        if site.residual is not None:
            restore = install_residual_restore(model.get_submodule(site.residual), channels)
            if folded_z is not None:  # compose with an existing restore: x -> (x * s) * s0 + (z * s0 + z0)
                restore.shift.copy_(folded_z * restore.scale + restore.shift)
            restore.scale.mul_(s)
