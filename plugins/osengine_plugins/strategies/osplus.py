"""Outlier Suppression+ (Wei et al., EMNLP 2023): channel-wise shift and scale, folded into the producer.

shift  z_j = (max_t X_tj + min_t X_tj) / 2                (centres each channel: removes asymmetry)
       With shift_quantile=q > 0 the extremes are the q and 1-q quantiles of the channel over the calibration tokens
       instead (beyond the paper, for runtime shifts on models with massive activations: a channel whose maximum
       comes from a few attention-sink tokens would otherwise be shifted for every token by half that maximum).
scale  s_j = max(1, max_t |X_tj - z_j| / t)              (only channels wider than t are squeezed)
t      1-D grid search from hi = max |X - z| down to the architecture's lower end, max(100, hi / 0.5) steps,
       scored by the error of the inspected output (attention output, fc1 pre-activation, SiLU(gate) * up, ...)
       with the consumers' weights and input fake-quantized; the activation range is (-t, t) for per-tensor
       quantizers, dynamic for per-token / per-group ones.
       The paper's grid has hi / 0.5 points, thousands for massive activations (SmolLM2's down_proj input reaches
       ~3000). By default the grid is capped at max_grid_steps points and the best one is then refined on a second
       grid of the same size spanning its two neighbours, which reaches the paper's 0.5 resolution for hi up to
       max_grid_steps^2 / 2 at a fraction of the cost. max_grid_steps=0 runs the paper's full grid.
"""
import math
from typing import Optional

import torch

from osengine.plugin_api import Migration, PluginError, Strategy, grid

SHIFT_MODES = ("auto", "fold", "runtime", "none")


def channel_quantiles(data, q: float, chunk: int = 256) -> tuple:
    """Per channel, the q and 1-q quantiles (nearest rank) of the site's input over all real calibration tokens;
    channels are sorted a chunk at a time to bound memory."""
    tokens = torch.cat([data.tokens(i) for i in range(len(data.inputs))]).float()
    n = tokens.shape[0]
    k_lo, k_hi = min(n, max(1, round(q * (n - 1)) + 1)), min(n, max(1, round((1 - q) * (n - 1)) + 1))
    lo, hi = [], []
    for start in range(0, tokens.shape[1], chunk):
        part = tokens[:, start:start + chunk]
        lo.append(part.kthvalue(k_lo, dim=0).values)
        hi.append(part.kthvalue(k_hi, dim=0).values)
    return torch.cat(lo), torch.cat(hi)


class OSPlus(Strategy):
    name = "osplus"
    description = ("Outlier Suppression+: shift + scale from a t grid search on the inspected output, folded "
                   "(options: shift=auto|fold|runtime|none, shift_quantile, shift_sites, max_grid_steps)")
    distributed = True   # channel_min / channel_max / error, except shift_quantile (refused with several processes)

    def __init__(self, shift: str = "auto", max_grid_steps: int = 100, min_t: Optional[float] = None,
                 shift_quantile: float = 0.0, shift_sites=None):
        if shift not in SHIFT_MODES:
            raise PluginError(f"osplus option 'shift' must be one of {SHIFT_MODES}, got {shift!r}")
        if isinstance(shift_quantile, bool) or not isinstance(shift_quantile, (int, float)) \
                or not 0.0 <= shift_quantile < 0.5:
            raise PluginError(f"osplus option 'shift_quantile' must be a number in [0, 0.5), got {shift_quantile!r}")
        if not isinstance(max_grid_steps, int) or max_grid_steps == 1 or max_grid_steps < 0:
            raise PluginError(f"osplus option 'max_grid_steps' must be 0 (full grid) or an integer >= 2, "
                              f"got {max_grid_steps!r}")
        self.shift_mode, self.max_grid_steps, self.min_t = shift, max_grid_steps, min_t
        self.shift_quantile = float(shift_quantile)
        if isinstance(shift_sites, str):
            shift_sites = [n.strip() for n in shift_sites.split(",") if n.strip()]
        if shift_sites is not None and (not isinstance(shift_sites, (list, tuple)) or not shift_sites
                                        or not all(isinstance(n, str) for n in shift_sites)):
            raise PluginError(f"osplus option 'shift_sites' must be site names (e.g. 'attn,mlp'), got {shift_sites!r}")
        self.shift_sites = None if shift_sites is None else tuple(shift_sites)

    def _shift(self, data):
        """(shift tensor or None, runtime?) — 'auto' folds where the producer has a bias (LayerNorm) and leaves
        RMSNorm models scale-only, as the paper does."""
        mode = self.shift_mode
        if mode == "auto":
            mode = "fold" if data.shift_foldable else "none"
        if mode == "fold" and not data.shift_foldable:
            raise PluginError(f"osplus: shift=fold is impossible at site {data.site.name} (producer "
                              f"{data.site.producer} has no bias); use shift=runtime or shift=none")
        if mode == "none" or (self.shift_sites is not None and data.site.name not in self.shift_sites):
            return None, False
        if self.shift_quantile > 0:
            if data.reduction.world_size > 1:
                raise PluginError("osplus option 'shift_quantile' needs every calibration token in one process; "
                                  "it is not supported with several processes (torch.distributed)")
            lo, hi = channel_quantiles(data, self.shift_quantile)
        else:
            lo, hi = data.channel_min().float(), data.channel_max().float()
        return (lo + hi) / 2, mode == "runtime"

    @staticmethod
    def _search(data, z, amax, candidates):
        best_t, best_err = candidates[0], math.inf
        for t in candidates:
            err = data.error(shift=z, scale=(amax / t).clamp(min=1.0), clip=t)
            if err < best_err:
                best_t, best_err = t, err
        return best_t, best_err

    def migrate(self, data):
        z, runtime = self._shift(data)
        lo, hi = data.channel_min().float(), data.channel_max().float()
        if z is not None:
            lo, hi = lo - z, hi - z
        amax = torch.maximum(-lo, hi).clamp(min=1e-8)
        t_hi = float(amax.max())
        t_lo = float(self.min_t if self.min_t is not None else data.scale_search_min)
        steps = max(100, math.floor(t_hi / 0.5))
        capped = 0 < self.max_grid_steps < steps
        candidates = grid(t_hi, t_lo, self.max_grid_steps if capped else steps)
        best_t, best_err = self._search(data, z, amax, candidates)
        evaluated = len(candidates)
        if capped and len(candidates) > 1:  # refine between the best point's neighbours (a range below the
            # grid's lower end gives a single candidate: nothing to refine)
            step = candidates[0] - candidates[1]
            fine = grid(min(t_hi, best_t + step), max(t_lo, best_t - step), self.max_grid_steps)
            t, err = self._search(data, z, amax, fine)
            evaluated += len(fine)
            if err < best_err:
                best_t, best_err = t, err
        scale = (amax / best_t).clamp(min=1.0)
        info = {"t": best_t, "t_max": t_hi, "grid_points": evaluated, "error": best_err,
                "error_no_migration": data.error()}
        return Migration(shift=z, scale=scale, runtime_shift=runtime, info=info)
