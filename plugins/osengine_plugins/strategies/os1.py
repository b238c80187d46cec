"""Outlier Suppression v1 (Wei et al., NeurIPS 2022): gamma migration and token-wise clipping.

Gamma migration  the LayerNorm / RMSNorm weight gamma amplifies a few channels (the outliers); OS v1 quantizes the
                 "non-scaling" norm output x_hat + beta / gamma and moves gamma into the next linears' input columns
                 (and, for post-LN models, onto the residual shortcut). Here that is a scale-only migration with
                 s = |gamma| at every site a norm produces: exact in floating point, the sign staying in the norm
                 (a symmetric quantizer does not see a channel's sign, and a scale must be positive to fold).
                 Sites produced by linear rows (LLaMA's down_proj input) have no gamma and are left alone.
Token-wise clipping  the coarse stage: static activation ranges from quantiles of the per-token extremes, the
                 quantile chosen by the block's output error (the activation observer "search", usable by any
                 strategy). With clipping=search (the default) os1 sets that observer on every static activation
                 spec of the recipe; dynamic per-token specs need no clipping and stay as they are. The optional
                 fine stage (LSQ+ training of scale and zero point) is not implemented.
"""
from dataclasses import replace

from osengine.plugin_api import Migration, PluginError, Strategy

CLIPPING_MODES = ("search", "recipe")
GAMMA_FLOOR = 1e-5   # a zero gamma stays a zero channel (weight 0 / floor) instead of a division by zero


def _with_search(spec):
    return spec if spec.dynamic else replace(spec, observer="search")


class OS1(Strategy):
    name = "os1"
    description = ("Outlier Suppression v1: gamma migration (norm weight folded into the next linears) and "
                   "token-wise clipping of static ranges (options: clipping=search|recipe)")

    def __init__(self, clipping: str = "search"):
        if clipping not in CLIPPING_MODES:
            raise PluginError(f"os1 option 'clipping' must be one of {CLIPPING_MODES}, got {clipping!r}")
        self.clipping = clipping

    def adapt_recipe(self, recipe, model, arch):
        if self.clipping == "recipe":
            return recipe
        return replace(recipe, activations=_with_search(recipe.activations),
                       activation_overrides=tuple((k, _with_search(v)) for k, v in recipe.activation_overrides))

    def migrate(self, data):
        site = data.site
        if site.producer_kind not in ("layernorm", "rmsnorm"):
            return None
        gamma = data.model.get_submodule(site.producer).weight.detach().float()
        if gamma.shape != (data.channels,):
            raise PluginError(f"os1: the weight of {site.producer} has shape {tuple(gamma.shape)}, expected "
                              f"({data.channels},) (one gamma per channel of site {site.name})")
        scale = gamma.abs().clamp(min=GAMMA_FLOOR)
        return Migration(scale=scale, info={"gamma_max": float(scale.max()), "gamma_negative": int((gamma < 0).sum()),
                                            "error": data.error(scale=scale), "error_no_migration": data.error()})


__all__ = ["OS1"]
