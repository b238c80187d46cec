"""Quantized models running on the engine: EngineLinear against float and fake-quant references."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import osengine
from osengine.runtime.convert import convert_to_engine
from osengine.runtime.linear import EngineConversionError, EngineLinear

from tiny_models import tiny_llama


@pytest.mark.parametrize("weight_bits,act_bits,group", [(8, 8, 0), (4, 8, 0), (4, 8, 32), (4, 4, 0), (4, 4, 32)])
def test_engine_linear_approximates_the_float_layer(weight_bits, act_bits, group):
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    layer = EngineLinear.from_float(linear, weight_bits=weight_bits, weight_group_size=group, act_bits=act_bits,
                                    act_group_size=group if act_bits == 4 else 0)
    y, want = layer(x), linear(x)
    assert y.shape == want.shape and y.dtype == torch.float32
    tolerance = {8: 0.02, 4: 0.2}[min(weight_bits, act_bits)]
    assert ((y - want).norm() / want.norm()).item() < tolerance


def test_engine_linear_runtime_shift_is_carried_in_the_bias():
    # W (x - z) + (b + W z) == W x + b: the engine quantizes x - z and adds W z in the epilogue.
    torch.manual_seed(2)
    linear = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32) + 30.0 * (torch.arange(32) == 5)
    z = torch.zeros(32)
    z[5] = 30.0
    shifted = torch.nn.Linear(32, 16)
    with torch.no_grad():
        shifted.weight.copy_(linear.weight)
        shifted.bias.copy_(linear.bias + linear.weight @ z)
    plain = EngineLinear.from_float(linear)
    fused = EngineLinear.from_float(shifted, input_shift=z)
    want = linear(x)
    err_plain = ((plain(x) - want).norm() / want.norm()).item()
    err_fused = ((fused(x) - want).norm() / want.norm()).item()
    assert err_fused < err_plain / 3


def test_static_activation_parameters_are_required():
    with pytest.raises(ValueError, match="static activation quantization needs act_scale"):
        EngineLinear.from_float(torch.nn.Linear(8, 8), act_dynamic=False)


W4A8_MSE = {"name": "w4a8-mse", "weights": {"bits": 4, "granularity": "per-channel", "observer": "mse"},
            "activations": {"bits": 8, "granularity": "per-token"}}  # clipped weights: codes recovered all the same


@pytest.mark.parametrize("recipe", ["w8a8-static", "w8a8-token", "w4a8", W4A8_MSE],
                         ids=lambda r: r if isinstance(r, str) else r["name"])
def test_converted_model_matches_the_fake_quant_model(recipe):
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    osengine.quantize(model, recipe=recipe, strategy="osplus", calibration=calibration, progress=False)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        fake_tokens = model.generate(ids[:1, :8], max_new_tokens=16, do_sample=False)
        convert_to_engine(model)
        assert any(isinstance(m, EngineLinear) for m in model.modules())
        got = model(input_ids=ids).logits
        engine_tokens = model.generate(ids[:1, :8], max_new_tokens=16, do_sample=False)  # KV cache path
    assert ((got - want).norm() / want.norm()).item() < 1e-3
    assert torch.equal(engine_tokens, fake_tokens)


def test_unsupported_recipes_are_refused_with_the_layer_named():
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    osengine.quantize(model, recipe="w6a6-token", strategy="minmax", calibration=calibration, progress=False)
    with pytest.raises(EngineConversionError, match=r"model.layers.0.self_attn.q_proj: the engine runs symmetric "
                                                    r"weights only"):
        convert_to_engine(model)
    with pytest.raises(EngineConversionError, match="no quantized linear layers"):
        convert_to_engine(tiny_llama())
