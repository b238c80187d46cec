"""Shared by the strategy and training tests: a strategy's folds run alone (nothing quantized), and a tiny LLaMA folder
quantized by a strategy, reloaded and run on the engine."""
import copy

import torch

from osengine import api
from osengine.calibrate.pipeline import BLOCK_STEPS, calibrate_blockwise
from osengine.plugin_api import make_strategy, resolve_architecture
from osengine.quant.layers import set_integer_exact
from osengine.quant.recipes import load_recipe
from osengine.runtime.simulate import simulate_folded_prologues

FOLD_ONLY = tuple(s for s in BLOCK_STEPS if s.name in ("wrap", "migrate", "propagate"))


def fold_only(model, strategy, tokens, recipe="w8a8-static", **options):
    """Run `strategy`'s migrations on `model` (in place) with no weight or activation quantized; the report."""
    arch = resolve_architecture(model)
    strat = make_strategy(strategy, options)
    recipe = strat.adapt_recipe(load_recipe(recipe), model, arch)
    return calibrate_blockwise(model, arch, recipe, strat, tokens, batch_size=4, progress=False, steps=FOLD_ONLY)


def relative_difference(out, ref) -> float:
    """max |out - ref| / max |ref|."""
    return ((out - ref).abs().max() / ref.abs().max()).item()


def engine_matches_simulation(folder, model) -> bool:
    """The folder reloaded as fake quant equals `model`, and on the engine equals the integer-exact simulation."""
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    reloaded, _ = api.load_model(folder)
    engine_model, _ = api.load(folder)
    with torch.no_grad():
        same_reload = torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        exact = copy.deepcopy(model)
        set_integer_exact(exact)
        simulate_folded_prologues(exact, engine_model)
        return same_reload and torch.equal(exact(input_ids=ids).logits, engine_model(input_ids=ids).logits)
