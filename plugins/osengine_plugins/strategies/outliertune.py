"""OutlierTune (Wang et al. 2024, arXiv 2406.18832): symmetrization and pre-executed dequantization.

Symmetrization  at every site a norm produces (the inputs of q/k/v and fc1 or gate/up), the per-channel shift
                z_j = mean over calibration sequences of (max_t X_tj + min_t X_tj) / 2
                (an average of per-sequence midpoints, not one global midrange). Folded into a LayerNorm's bias; an
                RMSNorm has none, so there it is a runtime shift (the engine subtracts it before quantizing, and the
                consumers' biases carry W z) where the paper's code gives the norm a bias: the same arithmetic.
Pre-executed dequantization  after the shift, a_j = max_t |X_tj - z_j| and Delta_j = a_j / (2^(b-1) - 1); the norm
                emits X / Delta (Delta folded into its weight, and into the consumers' weight columns: exactly
                SmoothQuant with s = Delta), so its output already sits on a unit-step grid: the static per-tensor
                activation scale is 1 and the GEMM needs no per-channel activation scale.
Which inputs stay per-token dynamic (the paper's choice): every linear not fed by a norm (o_proj / out_proj /
                dense, down_proj / fc2 / dense_4h_to_h). adapt_recipe gives those linears a per-token dynamic
                override of the recipe's activation bits when the recipe is static per-tensor; a dynamic recipe is
                run as it is (the transform then only evens out the channels before per-token quantization).
GPTQ after folding (the paper's) is the recipe's weights.rounding: gptq (accuracy.py: +gptq).
"""
from dataclasses import replace

import torch

from osengine.plugin_api import Migration, PluginError, Strategy

NORM_PRODUCERS = ("layernorm", "rmsnorm")


def mean_sequence_midpoints(data) -> torch.Tensor:
    """Per channel, the mean over calibration sequences of (max + min) / 2 over each sequence's real tokens."""
    midpoints = []
    for i, x in enumerate(data.inputs):
        x = x.float().reshape(-1, x.shape[-2], x.shape[-1])    # [sequences, tokens, channels]
        mask = data._mask(i)
        mask = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask.reshape(x.shape[:2])
        mask = mask.to(x.device)[..., None]
        lo = x.masked_fill(~mask, float("inf")).amin(dim=1)
        hi = x.masked_fill(~mask, float("-inf")).amax(dim=1)
        midpoints.append(((lo + hi) / 2)[mask.any(dim=1).squeeze(-1)])   # sequences with a real token
    all_midpoints = torch.cat(midpoints)
    if all_midpoints.numel() == 0:
        raise PluginError(f"outliertune: site {data.site.name} saw no real calibration token")
    return all_midpoints.mean(dim=0)


class OutlierTune(Strategy):
    name = "outliertune"
    description = ("OutlierTune: per-channel symmetrization shift and pre-executed dequantization (norm emits "
                   "X / Delta, unit activation scale); outputs of attention and MLP stay per-token dynamic "
                   "(options: shift=true|false)")

    def __init__(self, shift: bool = True):
        if isinstance(shift, str) and shift.lower() in ("true", "false"):
            shift = shift.lower() == "true"
        if not isinstance(shift, bool):
            raise PluginError(f"outliertune option 'shift' must be true or false, got {shift!r}")
        self.shift = shift

    def adapt_recipe(self, recipe, model, arch):
        act = recipe.activations
        if act.dynamic or act.granularity != "per-tensor":
            return recipe
        blocks = arch.blocks(model)
        if not blocks:
            raise PluginError(f"outliertune: architecture {arch.name} found no blocks in the model")
        norm_fed = {c for s in arch.sites(model, 0) if s.producer_kind in NORM_PRODUCERS for c in s.consumers}
        block = model.get_submodule(blocks[0])
        others = [name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)
                  and f"{blocks[0]}.{name}" not in norm_fed]
        per_token = replace(act, granularity="per-token", dynamic=True, observer="minmax", group_size=None,
                            full_range=False)
        overrides = tuple((name, per_token) for name in others
                          if not any(name == k for k, _ in recipe.activation_overrides))
        return replace(recipe, activation_overrides=recipe.activation_overrides + overrides)

    def migrate(self, data):
        site = data.site
        if site.producer_kind not in NORM_PRODUCERS:
            return None   # per-token dynamic input (adapt_recipe): nothing to pre-dequantize
        z = mean_sequence_midpoints(data) if self.shift else None
        lo, hi = data.channel_min().float(), data.channel_max().float()
        if z is not None:
            lo, hi = lo - z, hi - z
        qmax = 2 ** (data.act_spec.bits - 1) - 1
        delta = (torch.maximum(-lo, hi) / qmax).clamp(min=1e-8)
        runtime = z is not None and not data.shift_foldable
        return Migration(shift=z, scale=delta, runtime_shift=runtime,
                         info={"delta_max": float(delta.max()), "delta_min": float(delta.min()),
                               "error": data.error(shift=z, scale=delta), "error_no_migration": data.error()})


__all__ = ["OutlierTune"]
