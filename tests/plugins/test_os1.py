"""Outlier Suppression v1 (strategy os1): gamma migration is exact, token-wise clipping is switched on for static
recipes, and the result beats MinMax where the outliers come from the norms' gamma."""
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import osengine
from osengine import api
from osengine.io.checkpoint import MANIFEST_FILE
from osengine.plugin_api import PluginError, make_strategy, resolve_architecture
from osengine.quant.recipes import load_recipe

from strategy_testing import engine_matches_simulation, fold_only, relative_difference
from tiny_models import ARCHS, build, inject_outliers, make_model, model_output, tiny_llama_folder


@pytest.mark.parametrize("kind", ARCHS)
def test_gamma_migration_is_exact_and_moves_every_norm_gamma(kind, tokens):
    model = make_model(kind).double()
    ref = model_output(model, tokens)
    report = fold_only(model, "os1", tokens)
    assert relative_difference(model_output(model, tokens), ref) < 1e-6   # the folds compute in fp32
    migrated = [e for e in report["sites"] if "migration" in e]
    assert migrated and all(e["migration"]["gamma_max"] >= 12.0 for e in migrated)   # the injected gammas
    # what the norm keeps is the sign of gamma only (the injected -9 stays negative)
    arch = resolve_architecture(model)
    for i in range(len(arch.blocks(model))):
        for site in arch.sites(model, i):
            if site.producer_kind in ("layernorm", "rmsnorm"):
                w = model.get_submodule(site.producer).weight
                assert torch.allclose(w.abs(), torch.ones_like(w)) and w[17] < 0
    # sites without a gamma (LLaMA's down_proj input, produced by up_proj rows) are left alone
    assert {e["site"] for e in report["sites"] if "migration" not in e} == (
        {"down"} if kind in ("llama", "qwen2") else set())


def _error(model, strategy, recipe, tokens):
    ref = model_output(model, tokens)
    api.quantize(model, recipe=recipe, strategy=strategy, calibration=tokens, batch_size=4, progress=False)
    return (model_output(model, tokens) - ref).pow(2).mean().item()


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("recipe", ["w8a8-static", "w6a6"])
def test_os1_beats_minmax_on_gamma_outliers(kind, recipe, tokens):
    # Outliers injected in the norms (gamma and, for LayerNorm, beta) only: what OS v1 addresses. Large up_proj rows
    # (LLaMA's down_proj input) have no gamma to migrate and are left out here.
    def model():
        return inject_outliers(build(kind), up_rows=False)
    assert _error(model(), "os1", recipe, tokens) < _error(model(), "minmax", recipe, tokens)


def test_static_recipes_get_token_wise_clipping_and_dynamic_ones_stay():
    model = build("llama")
    arch = resolve_architecture(model)
    os1 = make_strategy("os1", None)
    static = os1.adapt_recipe(load_recipe("w8a8-mixed"), model, arch)
    assert static.activations.observer == "search" and not static.activations.dynamic
    assert dict(static.activation_overrides)["down_proj"].dynamic            # per-token override untouched
    dynamic = load_recipe("w6a6-token")
    assert os1.adapt_recipe(dynamic, model, arch) == dynamic
    kept = make_strategy("os1", {"clipping": "recipe"}).adapt_recipe(load_recipe("w8a8-static"), model, arch)
    assert kept.activations.observer == "minmax"


def test_bad_option_is_named():
    with pytest.raises(PluginError, match="os1 option 'clipping'"):
        make_strategy("os1", {"clipping": "lsq"})
    with pytest.raises(PluginError, match="os1"):
        make_strategy("os1", {"alpha": 0.5})


def test_saved_folder_records_the_search_observer_and_runs_on_the_engine(tmp_path):
    base = tiny_llama_folder(tmp_path)
    calib = torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    model = osengine.quantize(str(base), recipe="w8a8-static", strategy="os1", calibration=calib, n_samples=4,
                              seq_len=32, out=tmp_path / "q", progress=False)
    manifest = json.loads((tmp_path / "q" / MANIFEST_FILE).read_text())
    assert manifest["strategy"] == "os1" and manifest["recipe"]["activations"]["observer"] == "search"
    assert model.osengine_report["clipping"]      # the search ran and was reported
    assert engine_matches_simulation(tmp_path / "q", model)
