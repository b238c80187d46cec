"""Models with an online Hadamard rotation (QuaRot: a linear's input rotated at run time, x H / sqrt(K), its weight
holding W H / sqrt(K)) on the engine: the engine-backed model (the rotation inside the quantize kernel, also behind
the fused SiLU gate of down_proj) equals the integer-exact fake-quant model bit for bit; what it cannot run is refused
naming the layer."""
import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import osengine  # noqa: E402
from osengine.quant.hadamard import hadamard_matrix  # noqa: E402
from osengine.quant.layers import FakeQuantLinear, set_integer_exact  # noqa: E402
from osengine.runtime.convert import convert_to_engine  # noqa: E402
from osengine.runtime.linear import EngineConversionError, EngineLinear  # noqa: E402
from osengine.runtime.simulate import simulate_folded_prologues  # noqa: E402

from tiny_models import tiny_llama  # noqa: E402

# W4A4 with groups: the rotation spans the row, the groups split the rotated row
W4A4_GROUP32 = {"name": "w4a4-group32",
                "weights": {"bits": 4, "symmetric": True, "granularity": "per-group", "group_size": 32},
                "activations": {"bits": 4, "symmetric": False, "granularity": "per-group", "group_size": 32,
                                "dynamic": True}}
RECIPES = ["w8a8-static", "w8a8-token", "w4a8", W4A4_GROUP32]


def rotate_down_projections(model) -> list:
    """Every block's mlp.down_proj as a FakeQuantLinear with an online Hadamard rotation of its input, its weight
    W H / sqrt(K) (float64 product, cast back): the model computes the same function (H is orthogonal). Done before
    quantization, so that calibration observes the rotated inputs and the weights are quantized rotated."""
    names = []
    for i, layer in enumerate(model.model.layers):
        down = FakeQuantLinear(layer.mlp.down_proj)
        with torch.no_grad():
            h = hadamard_matrix(down.in_features)
            down.weight.copy_((down.weight.double() @ h).to(down.weight.dtype))
        down.set_input_rotation("hadamard")
        layer.mlp.down_proj = down
        names.append(f"model.layers.{i}.mlp.down_proj")
    return names


def rotated_tiny_llama(recipe, intermediate_size=192):
    """A tiny LLaMA (intermediate size 192 = 12 * 16: a Paley base and Sylvester blocks) with rotated down_proj
    inputs, quantized; strategy minmax (an OS+ migration would have to commute with the rotation)."""
    model = tiny_llama(intermediate_size=intermediate_size)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        names = rotate_down_projections(model)
        rotated = model(input_ids=ids).logits
    assert ((rotated - before).abs().max() / before.abs().max()).item() < 1e-5  # the same function in float
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    osengine.quantize(model, recipe=recipe, strategy="minmax", calibration=calibration, progress=False)
    for name in names:
        layer = model.get_submodule(name)
        assert layer.input_rotation == "hadamard" and layer.weight_spec is not None
    return model, names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r if isinstance(r, str) else r["name"])
def test_engine_model_with_rotated_down_proj_equals_the_integer_exact_simulation(recipe):
    model, names = rotated_tiny_llama(recipe)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    generate = dict(max_new_tokens=16, do_sample=False)
    simulation = model
    with torch.no_grad():
        unfused = convert_to_engine(copy.deepcopy(model), fuse=False)
        deployed = convert_to_engine(copy.deepcopy(model))
        for engine in (unfused, deployed):
            for name in names:
                layer = engine.get_submodule(name)
                assert isinstance(layer, EngineLinear) and layer.input_rotation == "hadamard"
                assert "rotation=hadamard" in repr(layer)
        # down_proj reads [gate | up] and computes silu(gate) * up, then rotates it, in one quantize call
        assert all(deployed.get_submodule(name).prologue.silu_gate for name in names)
        set_integer_exact(simulation)
        # no folded prologues yet, but the engine model's RoPE and attention (the native runtime's)
        assert simulate_folded_prologues(simulation, unfused) == 0
        assert torch.equal(unfused(input_ids=ids).logits, simulation(input_ids=ids).logits)
        assert torch.equal(unfused.generate(ids[:1, :8], **generate), simulation.generate(ids[:1, :8], **generate))
        assert simulate_folded_prologues(simulation, deployed) == 6  # 2 layers x (2 norms + 1 SiLU gate)
        assert torch.equal(deployed(input_ids=ids).logits, simulation(input_ids=ids).logits)
        assert torch.equal(deployed.generate(ids[:1, :8], **generate), simulation.generate(ids[:1, :8], **generate))


def test_the_rotation_matters():
    # the same quantized model with the engine's rotation switched off gives other logits: the test above would see
    # a kernel that skipped it
    model, names = rotated_tiny_llama("w8a8-token")
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        engine = convert_to_engine(copy.deepcopy(model), fuse=False)
        want = engine(input_ids=ids).logits
        for name in names:
            engine.get_submodule(name).input_rotation = None
            engine.get_submodule(name)._fast = None
        assert (engine(input_ids=ids).logits - want).abs().max() > 1e-2


def test_separate_shift_switch_rotates_before_the_shift():
    # the benchmark switch that subtracts the runtime shift in its own pass must still rotate first
    torch.manual_seed(7)
    layer = FakeQuantLinear(torch.nn.Linear(48, 16))  # 48 = 12 * 4
    layer.set_input_rotation("hadamard")
    from osengine.quant.spec import QuantSpec
    layer.quantize(QuantSpec(8, True, "per-channel"), QuantSpec(8, False, "per-token", dynamic=True))
    layer.input_shift = torch.randn(48)
    x = torch.randn(5, 48) * 2
    with torch.no_grad():
        engine = convert_to_engine_layer(layer)
        fused = engine(x)
        engine.set_separate_shift(True)
        separate = engine(x)
        set_integer_exact(layer)
        assert torch.equal(fused, layer(x))
    # the separate pass rounds (x H) - z the same way the kernel does: the same codes, the same outputs
    assert torch.equal(separate, fused)


def convert_to_engine_layer(layer):
    from osengine.runtime.convert import engine_linear_from_fake_quant
    return engine_linear_from_fake_quant("layer", layer)


def test_rotations_the_engine_cannot_run_are_refused_naming_the_layer():
    model, names = rotated_tiny_llama("w8a8-token", intermediate_size=128)
    model.get_submodule(names[1]).input_rotation = "random-orthogonal"
    with pytest.raises(EngineConversionError, match=r"model.layers.1.mlp.down_proj: EngineLinear: input_rotation "
                                                    r"must be None or 'hadamard'"):
        convert_to_engine(model)
    with pytest.raises(EngineConversionError, match="input_rotation 'hadamard' needs K = m \\* 2\\^k"):
        EngineLinear(torch.zeros(4, 100, dtype=torch.int8), torch.ones(4), None, weight_bits=8,
                     input_rotation="hadamard")
    with pytest.raises(EngineConversionError, match="input_rotation must be None or 'hadamard'"):
        EngineLinear(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4), None, weight_bits=8, input_rotation="x")
