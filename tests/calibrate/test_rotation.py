"""Rotating the residual stream (calibrate/rotation.py, strategy rotate): the rotated model equals the original in
floating point, composes with the other strategies and GPTQ, is saved and reloaded, and makes W4A4 on a model with
outlier channels far better than without."""
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import osengine  # noqa: E402
from osengine.calibrate.hessians import collect_hessians  # noqa: E402
from osengine.calibrate.pipeline import calibrate_blockwise, transforms_model  # noqa: E402
from osengine.calibrate.rotation import rotate_model  # noqa: E402
from osengine.plugins.api import PluginError  # noqa: E402
from osengine.plugins.registry import ComposedStrategy, make_strategy, resolve_architecture  # noqa: E402
from osengine.quant.hadamard import hadamard_transform  # noqa: E402
from osengine.quant.layers import FakeQuantLinear, RMSNorm  # noqa: E402
from osengine.quant.recipes import load_recipe  # noqa: E402

from tiny_models import build, inject_outliers, model_output  # noqa: E402

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
HELD_OUT = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5))


def model_of(kind, hidden=64, tied=True, **config):
    model = inject_outliers(build(kind, hidden_size=hidden, tie_word_embeddings=tied, **config))
    model.config.architectures = [type(model).__name__]
    return model


# hidden 64 (Sylvester: heads of 16, MLP 128) and 48 (Paley: 48 = 12 * 4, heads of 12, MLP 96 = 12 * 8)
@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("hidden,tied", [(64, True), (48, False)])
def test_the_rotated_model_equals_the_original_in_floating_point(kind, hidden, tied):
    model = model_of(kind, hidden, tied)
    reference = model_output(model, IDS)
    record = rotate_model(model, resolve_architecture(model), seed=3)
    assert (model_output(model, IDS) - reference).abs().max() < 1e-5
    assert record["seed"] == 3 and record["residual_channels"] == hidden and record["head_channels"] == hidden // 4
    assert record["lm_head_untied"] == (tied and kind != "opt" or (tied and kind == "opt"))
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    down, output = ("fc2", "self_attn.out_proj") if kind == "opt" else ("mlp.down_proj", "self_attn.o_proj")
    assert len(record["online"]) == 4 and all(n.endswith((down, output)) for n in record["online"])
    for name in record["online"]:
        assert model.get_submodule(name).input_rotation == "hadamard"
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(isinstance(m, RMSNorm) for m in norms) == (kind == "opt")   # LayerNorms replaced
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())


def test_the_rotation_spreads_outlier_channels():
    model = model_of("llama")
    captured = []
    for rotated in (False, True):
        if rotated:
            rotate_model(model, resolve_architecture(model))
        hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
        model_output(model, IDS)
        hook.remove()
    before, after = (x.abs().amax((0, 1)) for x in captured)
    assert before.max() / before.median() > 5 * (after.max() / after.median())


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_rotation_makes_w4a4_with_outlier_channels_far_better(kind):
    def error(strategy):
        model = model_of(kind)
        with torch.no_grad():
            reference = model_output(model_of(kind), HELD_OUT)
        osengine.quantize(model, "w4a4-token", strategy=strategy, calibration=CALIBRATION, progress=False)
        with torch.no_grad():
            out = model_output(model, HELD_OUT)
        return float((out - reference).pow(2).mean() / reference.pow(2).mean())

    plain, rotated = error("minmax"), error("rotate")
    assert rotated < 0.6 * plain, (plain, rotated)


@pytest.mark.parametrize("strategy", ["rotate+osplus", "rotate+smoothquant", "rotate+os1"])
def test_rotation_composes_with_the_strategies_and_gptq(strategy):
    model = model_of("llama")
    osengine.quantize(model, "w4a4-token", strategy=strategy, calibration=CALIBRATION, progress=False,
                      weight_rounding="gptq")
    report = model.osengine_report
    assert report["strategy"] == strategy
    assert report["model_transforms"]["rotation"]["online"] == [
        f"model.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.o_proj", "mlp.down_proj")]
    sites = {(r["block"], r["site"]) for r in report["sites"]}
    assert sites == {(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")}   # down_proj is read through the rotation
    assert len(report["gptq"]) == 14


@pytest.mark.parametrize("online,expected", [("down", ["mlp.down_proj"]), ("none", [])])
def test_online_rotations_can_be_limited(online, expected):
    model = model_of("llama")
    reference = model_output(model, IDS)
    record = rotate_model(model, resolve_architecture(model), online=online)
    assert record["online"] == [f"model.layers.{i}.{n}" for i in (0, 1) for n in expected]
    assert (model_output(model, IDS) - reference).abs().max() < 1e-5
    with pytest.raises(PluginError, match="rotate option 'online' must be down, all or none"):
        make_strategy("rotate", {"online": True})


@pytest.mark.parametrize("clipping,observer", [(True, "mse"), (False, "minmax")])
def test_rotate_clips_weights_unless_told_not_to(clipping, observer):
    model = model_of("llama")
    osengine.quantize(model, "w4a4-token", strategy="rotate+smoothquant", calibration=CALIBRATION, progress=False,
                      strategy_options={"weight_clipping": clipping})
    assert model.osengine_report["recipe"]["weights"]["observer"] == observer


def test_gptq_hessians_are_taken_from_the_rotated_input():
    model = model_of("llama")
    rotate_model(model, resolve_architecture(model))
    block = model.model.layers[0]
    inputs = []
    block.mlp.down_proj.register_forward_pre_hook(lambda _m, a: inputs.append(a[0]))
    calls = []
    block.register_forward_pre_hook(lambda _m, a, k: calls.append((a, k)), with_kwargs=True)
    model_output(model, IDS)
    sums = collect_hessians(block, "model.layers.0", load_recipe("w4a4-token"), calls, [None])
    x = hadamard_transform(inputs[0]).reshape(-1, 128).double()
    assert torch.allclose(sums["mlp.down_proj"].double(), x.T @ x, rtol=1e-5, atol=1e-3)


def test_composed_strategy_routes_options_and_refuses_two_migrating_strategies():
    composed = make_strategy("rotate+osplus", {"seed": 4, "max_grid_steps": 10, "rotate.heads": False})
    assert isinstance(composed, ComposedStrategy) and composed.name == "rotate+osplus"
    rotate, osplus = composed.parts
    assert (rotate.seed, rotate.heads, osplus.max_grid_steps) == (4, False, 10)
    assert composed.distributed and transforms_model(composed)
    assert not transforms_model(make_strategy("osplus"))
    with pytest.raises(PluginError, match="at most one of the composed strategies may migrate"):
        make_strategy("osplus+smoothquant")
    with pytest.raises(PluginError, match="option 'bogus' is taken by none of"):
        make_strategy("rotate+osplus", {"bogus": 1})
    with pytest.raises(PluginError, match="distinct strategies"):
        make_strategy("rotate+rotate")
    with pytest.raises(PluginError, match="unknown strategy 'nope'"):
        make_strategy("rotate+nope")
    with pytest.raises(PluginError, match="rotate option 'seed' must be a non-negative integer"):
        make_strategy("rotate", {"seed": -1})


@pytest.mark.parametrize("kind,config,match", [
    ("bloom", {}, "architecture bloom does not describe its residual stream"),
    ("bert", {}, "BERT is post-LayerNorm"),
    ("llama", {"hidden_size": 52, "num_attention_heads": 2},
     "residual stream of 52 channels: no Hadamard matrix of order 52"),
    ("llama", {"hidden_size": 24}, "attention heads of 6 channels"),
    ("llama", {"intermediate_size": 86}, "down_proj's 86 inputs"),
])
def test_models_that_cannot_be_rotated_are_refused_before_anything_changes(kind, config, match):
    model = build(kind, **config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PluginError, match=match):
        osengine.quantize(model, "w4a4-token", strategy="rotate", calibration=CALIBRATION, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_model_larger_than_memory_is_refused():
    model = model_of("llama")

    class Residency:
        pass

    with pytest.raises(PluginError, match="needs every weight in memory"):
        calibrate_blockwise(model, resolve_architecture(model), load_recipe("w4a4-token"), make_strategy("rotate"),
                            CALIBRATION, residency=Residency(), progress=False)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
def test_the_rotated_folder_reloads_to_the_same_model(kind, tmp_path):
    model = model_of(kind, tied=True)
    osengine.quantize(model, "w4a4-token", strategy="rotate+osplus", calibration=CALIBRATION, progress=False,
                      strategy_options={"max_grid_steps": 10, "seed": 7}, out=tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "osengine.json").read_text())
    rotation = manifest["model_transforms"]["rotation"]
    assert rotation["seed"] == 7 and rotation["lm_head_untied"] and rotation["kind"] == "hadamard"
    assert set(manifest["rotated_linears"]) == set(rotation["online"])
    assert all(manifest["layers"][n]["input_rotation"] == "hadamard" for n in rotation["online"])
    assert bool(manifest["rms_norms"]) == (kind == "opt")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    reloaded = osengine.load_model(tmp_path / "q")[0]
    assert torch.equal(model_output(reloaded, HELD_OUT), model_output(model, HELD_OUT))
    assert isinstance(reloaded.get_submodule(rotation["online"][0]), FakeQuantLinear)
