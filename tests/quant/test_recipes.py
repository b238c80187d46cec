import pytest

from osengine.quant.recipes import RecipeError, load_recipe, preset_names, recipe_from_dict

BASE = {"weights": {"bits": 8}, "activations": {"bits": 8}}


def test_presets_are_complete():
    assert set(preset_names()) >= {"w8a8-static", "w8a8-token", "w8a8-paper", "w6a6", "w6a6-token", "w4a4-token",
                                   "w4a8", "w4a4-group"}
    r = load_recipe("w8a8-static")
    assert (r.weights.granularity, r.weights.symmetric) == ("per-channel", True)
    assert (r.activations.granularity, r.activations.dynamic, r.activations.symmetric) == ("per-tensor", False, True)
    p = load_recipe("w8a8-paper")
    assert p.weights.granularity == "per-tensor" and p.bmm_inputs
    t = load_recipe("w4a4-token")
    assert t.activations.dynamic and not t.activations.symmetric and t.activations.granularity == "per-token"


def test_keep_fp_matching():
    r = load_recipe("w6a6-token", keep_fp=("down_proj",))
    assert r.keeps_fp("model.layers.3.mlp.down_proj")
    assert not r.keeps_fp("model.layers.3.mlp.up_proj")
    assert r.keeps_fp("lm_head")


def test_yaml_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("weights: {bits: 3, symmetric: false, granularity: per-group, group_size: 16}\n"
                 "activations: {bits: 5, granularity: per-token}\n")
    r = load_recipe(f)
    assert r.name == "mine" and r.weights.bits == 3 and r.weights.group_size == 16
    assert r.activations.dynamic  # per-token implies dynamic


@pytest.mark.parametrize("raw, field", [
    ({"weights": {"bits": 9}, "activations": {}}, "weights.bits"),
    ({"weights": {"bits": 1}, "activations": {}}, "weights.bits"),
    ({"weights": {}, "activations": {"granularity": "per-token", "dynamic": False}}, "activations.dynamic"),
    ({"weights": {"granularity": "per-token"}, "activations": {}}, "weights.granularity"),
    ({"weights": {"granularity": "per-group"}, "activations": {}}, "weights.group_size"),
    ({"weights": {}, "activations": {"observer": "ema"}}, "activations.observer"),
    ({"weights": {"observer": "quantile"}, "activations": {}}, "weights.observer"),
    ({"weights": {"observer": "search"}, "activations": {}}, "weights.observer"),
    ({"weights": {}, "activations": {"granularity": "per-token", "observer": "search"}}, "activations.observer"),
    ({"weights": {}, "activations": {"quantile": 2}}, "activations.quantile"),
    ({"weights": {}, "activations": {"full_range": "yes"}}, "activations.full_range"),
    ({"weights": {}, "activations": {"symmetric": False, "full_range": True}}, "activations.full_range"),
    ({"weights": {}, "activations": {"granularity": "per-token", "full_range": True}}, "activations.full_range"),
    ({"weights": {"full_range": True}, "activations": {}}, "weights.full_range"),
    ({"weights": {"rounding": "stochastic"}, "activations": {}}, "weights.rounding"),
    ({"weights": {"scale_dtype": "bfloat16"}, "activations": {}}, "weights.scale_dtype"),
    ({"weights": {}, "activations": {"scale_dtype": "float16"}}, "activations.scale_dtype"),
    ({"weights": {}, "activations": {"rounding": "gptq"}}, "activations.rounding"),
    ({"weights": {}, "activations": {}, "bmm_inputs": "yes"}, "bmm_inputs"),
    ({"weights": {}, "activations": {}, "keep_fp": ["embeddings"]}, "keep_fp"),
    ({"weights": {}, "activations": {}, "colour": 1}, "colour"),
    ({"weights": {}, "activations": {}, "prefix": "always"}, "prefix"),
    ({"weights": {}, "activations": {}, "prefix": [1, -2]}, "prefix"),
    ({"weights": {}, "activations": {}, "prefix": []}, "prefix"),
    ({"weights": {}, "activations": {}, "activation_overrides": ["down_proj"]}, "activation_overrides"),
    ({"weights": {}, "activations": {}, "activation_overrides": {"down_proj": {"bits": 9}}},
     "activation_overrides.down_proj.bits"),
    ({"weights": {"bitz": 8}, "activations": {}}, "weights.bitz"),
    ({"activations": {}}, "weights"),
])
def test_bad_recipe_names_the_field(raw, field):
    with pytest.raises(RecipeError, match=f"'{field}'"):
        recipe_from_dict(raw)


def test_the_prefix_switch_round_trips():
    assert recipe_from_dict({"weights": {}, "activations": {}}).prefix == "none"
    for value, kept in (("auto", "auto"), ([1, 216], (1, 216))):
        r = recipe_from_dict({"weights": {}, "activations": {}, "prefix": value})
        assert r.prefix == kept and recipe_from_dict(r.to_dict()) == r


def test_activation_overrides_pick_a_layers_spec():
    raw = load_recipe("w8a8-static").to_dict() | {
        "activation_overrides": {"down_proj": {"bits": 8, "granularity": "per-token", "dynamic": True}}}
    r = recipe_from_dict(raw)
    assert r.activation_spec("model.layers.3.mlp.down_proj").dynamic
    assert not r.activation_spec("model.layers.3.mlp.up_proj").dynamic
    assert recipe_from_dict(r.to_dict()) == r


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="w8a8-static"):
        load_recipe("w9a9")
    bad = tmp_path / "bad.yaml"
    bad.write_text("weights: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
