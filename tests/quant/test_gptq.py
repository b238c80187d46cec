import pytest
import torch

from osengine.quant.gptq import GPTQError, _column_grid, gptq_quantize_weight
from osengine.quant.layers import FakeQuantLinear, weight_codes_from_fake_quant
from osengine.quant.spec import QuantSpec, quantize_weight

SPECS = [
    QuantSpec(bits=4, symmetric=True, granularity="per-channel"),
    QuantSpec(bits=6, symmetric=False, granularity="per-channel"),
    QuantSpec(bits=4, symmetric=True, granularity="per-group", group_size=16),
    QuantSpec(bits=3, symmetric=False, granularity="per-group", group_size=32),
    QuantSpec(bits=8, symmetric=True, granularity="per-tensor"),
    QuantSpec(bits=4, symmetric=False, granularity="per-channel", observer="mse"),
]


def _correlated_inputs(tokens, channels, seed=0):
    """Inputs with correlated channels and a few large ones: where GPTQ's error feedback has something to use."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=g) / channels ** 0.5 + torch.eye(channels)
    x = torch.randn(tokens, channels, generator=g) @ mix
    x[:, :3] *= 8.0
    return x


def _output_error(x, w, q):
    return float((x @ (w - q).T).pow(2).sum())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{'sym' if s.symmetric else 'asym'}-"
                         f"{s.granularity}{s.group_size or ''}-{s.observer}")


@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (17, 96), (40, 128)])
def test_gptq_stays_on_the_grid_and_beats_nearest_rounding(spec, shape):
    torch.manual_seed(shape[0])
    w = torch.randn(*shape)
    x = _correlated_inputs(512, shape[1])
    q = gptq_quantize_weight(w, x.T @ x, spec)
    nearest = quantize_weight(w, spec)
    # On round-to-nearest's grid: integer codes in range for the original weight's step and zero point.
    delta, zero_point, _ = _column_grid(w.double(), spec)
    codes = q.double() / delta + zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= spec.qmin and codes.round().max() <= spec.qmax
    assert q.shape == w.shape and q.dtype == w.dtype
    assert _output_error(x, w, q) < _output_error(x, w, nearest)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.symmetric], ids=lambda s: f"{s.bits}b-{s.granularity}")
def test_symmetric_codes_are_recovered_exactly_from_the_values(spec):
    # The engine conversion and the exports read codes and steps back from the fake-quantized values; GPTQ pins each
    # row's (group's) largest weight to +-qmax so that this stays exact.
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    x = _correlated_inputs(256, 64, seed=3)
    layer = FakeQuantLinear(torch.nn.Linear(64, 24, bias=False))
    with torch.no_grad():
        layer.weight.copy_(gptq_quantize_weight(w, x.T @ x, spec))
    layer.weight_spec = spec
    codes, scale, group = weight_codes_from_fake_quant(layer)
    delta, _, _ = _column_grid(w.double(), spec)
    assert torch.equal(codes.double(), torch.round(layer.weight.detach().double() / delta))  # GPTQ's own codes
    step = scale.repeat_interleave(group, dim=1) if group else (scale[:, None] if scale.numel() > 1 else scale)
    assert torch.allclose(codes.float() * step, layer.weight.detach(), rtol=1e-6, atol=0)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    # A diagonal Hessian gives no column another column's error to absorb.
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    h = torch.diag(torch.rand(64) + 0.5)
    for spec in SPECS:
        # equal up to float rounding (GPTQ computes in float64); one code apart would be a whole step
        assert torch.allclose(gptq_quantize_weight(w, h, spec), quantize_weight(w, spec), rtol=1e-6, atol=1e-7)


def test_inputs_that_never_fire_keep_nearest_rounding():
    torch.manual_seed(2)
    w = torch.randn(8, 32)
    x = _correlated_inputs(256, 32)
    x[:, 5] = 0.0
    spec = QuantSpec(bits=4, symmetric=True, granularity="per-channel")
    q = gptq_quantize_weight(w, x.T @ x, spec)
    assert torch.isfinite(q).all()
    assert torch.allclose(q[:, 5], quantize_weight(w, spec)[:, 5], rtol=1e-6, atol=1e-7)


def test_bad_hessians_are_named():
    w = torch.randn(4, 8)
    spec = QuantSpec(bits=4)
    with pytest.raises(GPTQError, match=r"shape \(7, 7\), expected \(8, 8\)"):
        gptq_quantize_weight(w, torch.eye(7), spec)
    h = torch.eye(8)
    h[2, 3] = float("nan")
    with pytest.raises(GPTQError, match="not finite"):
        gptq_quantize_weight(w, h, spec)
