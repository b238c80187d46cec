"""Rotation (QuaRot, Ashkboos et al. 2024): the residual stream is rotated by a randomized Hadamard matrix folded into
the weights, each attention head's values by a Hadamard matrix, and the inputs of the attention output and MLP down
projections by a Hadamard transform at run time (osengine.calibrate.rotation). Outlier channels are spread over all
channels before quantization. Migrates no site itself: compose it with a strategy that does, rotation first
("rotate+osplus", "rotate+smoothquant"); GPTQ rounding composes through the recipe (weights.rounding: gptq)."""
from dataclasses import replace

from osengine.plugin_api import PluginError, Strategy, rotate_model


class Rotate(Strategy):
    name = "rotate"
    description = ("QuaRot-style Hadamard rotation of the residual stream and value heads, and online of the "
                   "o_proj / down_proj inputs; compose: rotate+osplus (options: seed, heads, online=all|down|none, "
                   "weight_clipping)")
    distributed = True   # prepare() is deterministic; migrate() takes no statistics
    migrates = False

    def __init__(self, seed: int = 0, heads: bool = True, online: str = "all", weight_clipping: bool = True):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise PluginError(f"rotate option 'seed' must be a non-negative integer, got {seed!r}")
        if not isinstance(heads, bool):
            raise PluginError(f"rotate option 'heads' must be true or false, got {heads!r}")
        if online not in ("down", "all", "none"):
            raise PluginError(f"rotate option 'online' must be down, all or none, got {online!r}")
        if not isinstance(weight_clipping, bool):
            raise PluginError(f"rotate option 'weight_clipping' must be true or false, got {weight_clipping!r}")
        self.seed, self.heads, self.online, self.weight_clipping = seed, heads, online, weight_clipping

    def adapt_recipe(self, recipe, model, arch):
        """QuaRot searches each weight row's clipping range (observer mse) for round-to-nearest and GPTQ alike: the
        rotated weights are Gaussian-like, so their extremes are worth clipping (option weight_clipping=false
        keeps the recipe's observer)."""
        if not self.weight_clipping or recipe.weights.observer != "minmax":
            return recipe
        return replace(recipe, weights=replace(recipe.weights, observer="mse"))

    def prepare(self, model, arch):
        return {"rotation": rotate_model(model, arch, seed=self.seed, heads=self.heads, online=self.online)}

    def migrate(self, data):
        return None
