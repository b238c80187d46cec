"""The integer-exact simulation (osengine.quant.integer_exact, quant.layers.set_integer_exact): the engine's floats,
bit for bit, from single operations up to whole models with the engine's folded prologues."""
import copy
from fractions import Fraction

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import osengine
from osengine.engine import ops
from osengine.quant.integer_exact import engine_rms_norm, engine_silu, fma32
from osengine.quant.layers import FakeQuantLinear, set_integer_exact
from osengine.quant.spec import QuantSpec
from osengine.runtime.convert import convert_to_engine, engine_linear_from_fake_quant
from osengine.runtime.simulate import simulate_folded_prologues

from tiny_models import tiny_llama


def test_fma32_rounds_once():
    # a * b + c = 1 + 3 * 2^-24 - 2^-60: just below the midpoint between 1 + 2^-23 and 1 + 2^-22. Rounding to
    # float64 first lands exactly on the midpoint, and the tie then goes to the even 1 + 2^-22: wrong.
    a = torch.tensor([2.0 ** -24 * (1 + 2.0 ** -18)])
    b = torch.tensor([1 - 2.0 ** -18])
    c = torch.tensor([1 + 2.0 ** -23])
    assert fma32(a, b, c).item() == 1 + 2.0 ** -23
    assert (a.double() * b.double() + c.double()).float().item() == 1 + 2.0 ** -22  # the naive way fails here
    torch.manual_seed(0)
    a, b, c = torch.randn(300), torch.randn(300), torch.randn(300) * 1e-3
    got = fma32(a, b, c)
    for x, y, z, r in zip(a.tolist(), b.tolist(), c.tolist(), got.tolist()):
        exact = Fraction(x) * Fraction(y) + Fraction(z)
        below = torch.tensor([r]).nextafter(torch.tensor([-1e30]))
        above = torch.tensor([r]).nextafter(torch.tensor([1e30]))
        assert abs(Fraction(r) - exact) <= min(abs(Fraction(below.item()) - exact), abs(Fraction(above.item()) - exact))


def _elements_differing(x, reference, **prologue):
    """How many elements of the engine's fused prologue on x differ from `reference` (float32): each row is quantized
    with the reference row as its shift and a step of 1e-30, so any difference of an ulp becomes a nonzero code."""
    differing = 0
    for row in range(x.shape[0]):
        q = ops.quantize(x[row:row + 1].contiguous(), bits=8, symmetric=True, shift=reference[row].contiguous(),
                         scale=torch.tensor([1e-30]), zero_point=torch.tensor([0], dtype=torch.int32), **prologue)
        differing += int((q.codes != 0).sum())
    return differing


@pytest.mark.parametrize("k", [1, 3, 17, 576, 4095])
def test_engine_rms_norm_and_silu_give_the_kernels_floats(k):
    torch.manual_seed(k)
    x = torch.randn(24, k) * 2
    x[:, 0] += 40.0
    weight = torch.rand(k) + 0.5
    norm = dict(rms_norm_weight=weight, rms_norm_eps=1e-5)
    assert _elements_differing(x, engine_rms_norm(x, weight, 1e-5), **norm) == 0
    gate_up = torch.cat([x * 3, x], dim=1)
    assert _elements_differing(gate_up, engine_silu(x * 3) * x, silu_gate=True) == 0
    if k == 576:  # the check has the power to see torch's own arithmetic differ
        assert _elements_differing(x, weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)), **norm) > 0
        assert _elements_differing(gate_up, torch.nn.functional.silu(x * 3) * x, silu_gate=True) > 0


INT8_WEIGHTS = QuantSpec(8, True, "per-channel")
EXACT_CASES = [  # (weight spec, activation spec, input shift)
    (INT8_WEIGHTS, QuantSpec(8, True, "per-tensor"), False),
    (INT8_WEIGHTS, QuantSpec(8, True, "per-tensor", full_range=True), True),
    (INT8_WEIGHTS, QuantSpec(8, False, "per-tensor"), True),
    (QuantSpec(8, True, "per-tensor"), QuantSpec(8, True, "per-tensor"), False),
    (INT8_WEIGHTS, QuantSpec(8, True, "per-token", dynamic=True), True),
    (INT8_WEIGHTS, QuantSpec(8, False, "per-token", dynamic=True), False),
    (QuantSpec(4, True, "per-channel"), QuantSpec(8, False, "per-token", dynamic=True), False),
    (QuantSpec(4, True, "per-group", group_size=32), QuantSpec(8, True, "per-token", dynamic=True), True),
    (QuantSpec(4, True, "per-group", group_size=32), QuantSpec(4, False, "per-group", group_size=32, dynamic=True),
     False),
]


@pytest.mark.parametrize("k,n", [(1, 3), (3, 17), (17, 1), (64, 4095), (4095, 17)])
@pytest.mark.parametrize("case", range(len(EXACT_CASES)))
def test_integer_exact_layer_computes_the_engines_floats(k, n, case):
    # The floating-point simulation rounds differently (~1e-7); the integer-exact one must give the same bits.
    weight_spec, act_spec, shift = EXACT_CASES[case]
    groups = [s.group_size for s in (weight_spec, act_spec) if s.granularity == "per-group"]
    if (weight_spec.bits == 4 and k % 2) or any(k % g for g in groups):
        pytest.skip("int4 packing / grouping needs K divisible by 2 / the group size")
    torch.manual_seed(k * 31 + n + case)
    layer = FakeQuantLinear(torch.nn.Linear(k, n))
    layer.quantize(weight_spec, act_spec)
    x = torch.randn(2, 7, k) * 3
    x[..., 0] += 25.0  # an asymmetric outlier channel
    if shift:
        layer.input_shift = torch.randn(k)
    with torch.no_grad():
        if not act_spec.dynamic:
            layer(x * 0.8)  # observe a narrower range than x has: values beyond it are clamped
            layer.act_quant.mode = "quantize"
        engine = engine_linear_from_fake_quant("layer", layer)(x)
        simulated = layer(x)
        assert set_integer_exact(layer) == 1
        exact = layer(x)
        assert torch.allclose(simulated, engine, rtol=1e-5, atol=1e-5 * engine.abs().max().item())
        assert torch.equal(exact, engine)
        set_integer_exact(layer, False)
        assert torch.equal(layer(x), simulated)


def test_integer_exact_refuses_what_the_engine_does_not_run():
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    osengine.quantize(model, recipe="w6a6-token", strategy="minmax", calibration=calibration, progress=False)
    with pytest.raises(ValueError, match="layer model.layers.0.self_attn.q_proj has asymmetric weights"):
        set_integer_exact(model)


@pytest.mark.parametrize("recipe", ["w8a8-static", "w8a8-token", "w4a8"])
def test_engine_model_equals_the_integer_exact_simulation(recipe):
    # Bit for bit, so that whole-model comparisons do not depend on how chaotic the model is (static quantization
    # of a model with massive activations turns a 1-ulp difference into a different code downstream): first with
    # the engine model's norms and SiLU in torch, then as deployed, with them folded into the quantize kernels.
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    osengine.quantize(model, recipe=recipe, strategy="osplus", calibration=calibration, progress=False)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    generate = dict(max_new_tokens=16, do_sample=False)
    simulation = model
    with torch.no_grad():
        unfused = convert_to_engine(copy.deepcopy(model), fuse=False)
        deployed = convert_to_engine(copy.deepcopy(model))
        set_integer_exact(simulation)
        # no folded prologues yet, but the engine model's RoPE and attention (the native runtime's)
        assert simulate_folded_prologues(simulation, unfused) == 0
        assert torch.equal(unfused(input_ids=ids).logits, simulation(input_ids=ids).logits)
        assert torch.equal(unfused.generate(ids[:1, :8], **generate), simulation.generate(ids[:1, :8], **generate))
        assert simulate_folded_prologues(simulation, deployed) == 6  # 2 layers x (2 norms + 1 SiLU gate)
        assert torch.equal(deployed(input_ids=ids).logits, simulation(input_ids=ids).logits)
        assert torch.equal(deployed.generate(ids[:1, :8], **generate), simulation.generate(ids[:1, :8], **generate))
