"""OutlierTune (strategy outliertune): the averaged-midpoint shift, the pre-executed dequantization (norm outputs on
a unit-step grid), the per-token dynamic outputs of attention and MLP, exact folds, and the engine running it."""
import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import osengine
from osengine import api
from osengine.io.checkpoint import MANIFEST_FILE
from osengine.plugin_api import PluginError, make_strategy, resolve_architecture
from osengine.quant.observers import ActQuantizer
from osengine.quant.recipes import load_recipe
from osengine_plugins.strategies.outliertune import mean_sequence_midpoints

from strategy_testing import engine_matches_simulation, fold_only, relative_difference
from tiny_models import ARCHS, make_model, model_output, tiny_llama_folder


def test_shift_is_the_mean_of_per_sequence_midpoints_over_real_tokens():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)]
    masks = [torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool), None]
    x[0][0, 3:] = 1e6   # padding: must not count
    data = SimpleNamespace(inputs=x, site=SimpleNamespace(name="s"), _mask=lambda i: masks[i])
    sequences = [x[0][0, :3], x[0][1], x[1][0], x[1][1]]
    want = torch.stack([(s.amax(0) + s.amin(0)) / 2 for s in sequences]).mean(0)
    assert torch.allclose(mean_sequence_midpoints(data), want)


@pytest.mark.parametrize("kind", ARCHS)
def test_folds_are_exact(kind, tokens):
    model = make_model(kind).double()
    ref = model_output(model, tokens)
    report = fold_only(model, "outliertune", tokens)
    assert relative_difference(model_output(model, tokens), ref) < 1e-6   # the folds compute in fp32
    migrated = {e["site"] for e in report["sites"] if "migration" in e}
    assert migrated == {"llama": {"attn", "mlp"}, "qwen2": {"attn", "mlp"}, "opt": {"attn", "fc1"},
                        "bloom": {"attn", "mlp"}, "bert": {"attn", "ffn"}}[kind]   # the norm-fed sites
    runtime = {e["migration"]["runtime_shift"] for e in report["sites"] if "migration" in e}
    assert runtime == {kind in ("llama", "qwen2")}    # RMSNorm has no bias to fold the shift into


def test_static_recipe_keeps_attention_and_mlp_outputs_per_token():
    model = make_model("opt")
    arch = resolve_architecture(model)
    recipe = make_strategy("outliertune", None).adapt_recipe(load_recipe("w8a8-static"), model, arch)
    overridden = {name: spec for name, spec in recipe.activation_overrides}
    assert set(overridden) == {"self_attn.out_proj", "fc2"}
    assert all(s.dynamic and s.granularity == "per-token" and s.bits == 8 for s in overridden.values())
    dynamic = load_recipe("w6a6-token")
    assert make_strategy("outliertune", None).adapt_recipe(dynamic, model, arch) == dynamic


@pytest.mark.parametrize("kind", ARCHS)
def test_norm_outputs_land_on_a_unit_step_grid_and_beat_minmax(kind, tokens):
    errors = {}
    for strategy in ("minmax", "outliertune"):
        model = make_model(kind)
        ref = model_output(model, tokens)
        api.quantize(model, recipe="w8a8-static", strategy=strategy, calibration=tokens, batch_size=4,
                     progress=False)
        errors[strategy] = (model_output(model, tokens) - ref).pow(2).mean().item()
    assert errors["outliertune"] < errors["minmax"], errors
    arch = resolve_architecture(model)
    sites = [s for i in range(len(arch.blocks(model))) for s in arch.sites(model, i)]
    norm_fed = {c for s in sites if s.producer_kind in ("layernorm", "rmsnorm") for c in s.consumers}
    attention = {c for s in sites if s.name == "attn" for c in s.consumers}
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer) and name.endswith(".act_quant"):
            linear = name[:-len(".act_quant")]
            if linear in norm_fed:
                assert not m.spec.dynamic, name
            else:
                assert m.spec.dynamic and m.spec.granularity == "per-token", name
            if linear in attention:   # the static step is 1: max |X / Delta| = 127 on the data Delta came from
                # (the block's input; the MLP's input moves a little once attention is quantized)
                assert abs(float(torch.maximum(m.lo.abs(), m.hi.abs())) - 127.0) < 1e-3, name


def test_bad_option_is_named():
    with pytest.raises(PluginError, match="outliertune option 'shift'"):
        make_strategy("outliertune", {"shift": "sometimes"})


@pytest.mark.parametrize("recipe", ["w8a8-static", "w8a8-token"])
def test_saved_folder_runs_on_the_engine(tmp_path, recipe):
    base = tiny_llama_folder(tmp_path)
    calib = torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    model = osengine.quantize(str(base), recipe=recipe, strategy="outliertune", calibration=calib, n_samples=4,
                              seq_len=32, out=tmp_path / "q", progress=False, weight_rounding="gptq")
    manifest = json.loads((tmp_path / "q" / MANIFEST_FILE).read_text())
    assert manifest["strategy"] == "outliertune"
    assert manifest["layers"]["model.layers.0.self_attn.q_proj"]["runtime_shift"]
    if recipe == "w8a8-static":
        assert manifest["recipe"]["activation_overrides"]["mlp.down_proj"]["dynamic"]
    assert engine_matches_simulation(tmp_path / "q", model)
