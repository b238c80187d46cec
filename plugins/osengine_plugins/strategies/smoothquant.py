"""SmoothQuant (Xiao et al. 2023): per-channel scale s_j = max|X_j|^alpha / max|W_j|^(1-alpha), no shift,
folded like OS+'s scale."""
from typing import Optional

import torch

from osengine.plugin_api import Migration, PluginError, Strategy


class SmoothQuant(Strategy):
    name = "smoothquant"
    description = "scale-only migration s = max|X|^alpha / max|W|^(1-alpha) (alpha: architecture default)"
    distributed = True   # channel_min / channel_max and the weights only

    def __init__(self, alpha: Optional[float] = None):
        if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
            raise PluginError(f"smoothquant option 'alpha' must be in [0, 1], got {alpha!r}")
        self.alpha = None if alpha is None else float(alpha)

    def migrate(self, data):
        alpha = data.smoothquant_alpha if self.alpha is None else self.alpha
        act_max = torch.maximum(data.channel_min().abs(), data.channel_max().abs()).float()
        w_max = torch.stack([w.abs().amax(dim=0) for w, _ in data.weights()]).amax(dim=0)
        scale = (act_max.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        return Migration(scale=scale, info={"alpha": alpha})
