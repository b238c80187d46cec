import pytest
import torch

from osengine.quant.layers import FakeQuantLinear
from osengine.quant.observers import ActQuantizer
from osengine.quant.spec import QuantSpec, quantize_dynamic, quantize_weight, symmetric_weight_codes


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_stay_in_range(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="per-token", dynamic=True)
    x = torch.randn(16, 32) * 5 + 2
    q = quantize_dynamic(x, spec)
    for row_x, row_q in zip(x, q):
        levels = torch.unique(row_q)
        assert len(levels) <= 2 ** bits - (1 if symmetric else 0)
        assert (row_q - row_x).abs().max() <= (row_x.max() - min(row_x.min(), 0)) / (2 ** bits - 2) + 1e-5


def test_full_range_symmetric_activations_reach_minus_2_to_the_b_minus_1():
    # Same step (max|x| / 127) as the paper's range; only values below the calibrated range get the extra code.
    restricted = QuantSpec(bits=8, symmetric=True, granularity="per-tensor")
    full = QuantSpec(bits=8, symmetric=True, granularity="per-tensor", full_range=True)
    assert (restricted.qmin, restricted.qmax, full.qmin, full.qmax) == (-127, 127, -128, 127)
    quantizers = {}
    for spec in (restricted, full):
        quantizers[spec.full_range] = q = ActQuantizer(spec)
        q(torch.tensor([-1.0, 1.27]))  # observe: step 0.01
        q.mode = "quantize"
    x = torch.tensor([-1.3, -1.276, -1.26, 0.5, 1.3])
    assert torch.equal(quantizers[False].codes(x)[0], torch.tensor([-127.0, -127.0, -126.0, 50.0, 127.0]))
    assert torch.equal(quantizers[True].codes(x)[0], torch.tensor([-128.0, -128.0, -126.0, 50.0, 127.0]))
    codes, step = quantizers[True].codes(x)
    assert torch.equal(quantizers[True](x), codes * step)


def test_weight_granularities():
    w = torch.randn(8, 64)
    w[0] *= 100
    per_tensor = quantize_weight(w, QuantSpec(bits=4, granularity="per-tensor"))
    per_channel = quantize_weight(w, QuantSpec(bits=4, granularity="per-channel"))
    per_group = quantize_weight(w, QuantSpec(bits=4, granularity="per-group", group_size=16))
    def err(q):
        return (q[1:] - w[1:]).pow(2).mean()
    assert err(per_group) < err(per_channel) < err(per_tensor)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(w, QuantSpec(bits=4, granularity="per-group", group_size=24))


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64), (4, 0)])
def test_float16_weight_scales_are_exact_and_recovered(observer, bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(24, 128) * torch.logspace(-2, 1, 24)[:, None]
    w[3, :5] = 0.0  # a group with a few zeros
    w[5] = 1e-4     # a row whose step is below float16's normal range: kept in float32
    granularity = "per-group" if group_size else "per-channel"
    spec32 = QuantSpec(bits=bits, granularity=granularity, group_size=group_size or None, observer=observer)
    spec16 = QuantSpec(bits=bits, granularity=granularity, group_size=group_size or None, observer=observer,
                       scale_dtype="float16")
    q32, q16 = quantize_weight(w, spec32), quantize_weight(w, spec16)
    codes32, scale32, _ = symmetric_weight_codes(q32, bits, granularity, group_size)
    codes16, scale16, _ = symmetric_weight_codes(q16, bits, granularity, group_size)
    normal = scale16 >= 2.0 ** -14
    # the recovered steps are float16 numbers where they are normal, unchanged elsewhere
    assert torch.equal(scale16[normal], scale16[normal].half().float())
    assert torch.equal(scale16[~normal], scale32[~normal])
    assert (~normal).any() and normal.any()
    rel = ((scale16 - scale32) / scale32).abs().max()
    assert rel <= 2.0 ** -11
    # the fake-quantized weights are exactly codes x recovered steps, every row / group still reaches +-qmax
    units = q16.reshape(24, -1, group_size) if group_size else q16
    steps = scale16[..., None] if group_size else scale16[:, None]
    assert torch.equal((codes16.reshape_as(units).float() * steps).reshape_as(q16), q16)
    assert (codes16.reshape_as(units).abs().amax(dim=-1) == 2 ** (bits - 1) - 1).all()
    assert (q16 - w).abs().max() <= (q32 - w).abs().max() * 1.01 + 1e-12


@pytest.mark.parametrize("granularity, group_size", [("per-tensor", None), ("per-channel", None), ("per-group", 16)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_weight_observer_clips_only_where_it_helps(granularity, group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[1, 5] = 12.0  # one outlier: clipping it costs less than the coarse steps it forces on the rest
    minmax = QuantSpec(bits=4, symmetric=symmetric, granularity=granularity, group_size=group_size)
    mse = QuantSpec(bits=4, symmetric=symmetric, granularity=granularity, group_size=group_size, observer="mse")
    q_minmax, q_mse = quantize_weight(w, minmax), quantize_weight(w, mse)
    def rows(q):
        return (q - w).square().sum(dim=1)
    assert (rows(q_mse) <= rows(q_minmax) + 1e-6).all() or granularity == "per-tensor"
    assert rows(q_mse).sum() < rows(q_minmax).sum()
    if granularity != "per-group":  # (within a group of 16 the outlier may be worth keeping)
        assert q_mse[1, 5] < q_minmax[1, 5] - 0.1  # the outlier is clipped (MinMax keeps it: ~12)
    # A row whose values sit on the MinMax grid loses nothing to clipping: it keeps its MinMax quantization.
    grid = torch.linspace(-1, 1, 64) if symmetric else torch.linspace(0, 1, 64)
    exact = QuantSpec(bits=8, symmetric=symmetric, granularity="per-channel", observer="mse")
    on_grid = quantize_weight(grid[None], QuantSpec(bits=8, symmetric=symmetric, granularity="per-channel"))
    assert torch.equal(quantize_weight(on_grid, exact), on_grid)
    with pytest.raises(ValueError, match="observer"):
        quantize_weight(w, QuantSpec(bits=4, observer="quantile"))


def test_static_observers():
    batches = [torch.tensor([[-1.0, 2.0]]), torch.tensor([[-3.0, 4.0]])]
    for observer, (lo, hi) in (("minmax", (-3.0, 4.0)), ("avgminmax", (-2.0, 3.0))):
        q = ActQuantizer(QuantSpec(bits=8, observer=observer))
        for b in batches:
            assert torch.equal(q(b), b)  # observing passes through
        assert (q.lo.item(), q.hi.item(), q.batches.item()) == (lo, hi, 2)  # every batch counted once
        q.mode = "quantize"
        assert q(torch.tensor([[100.0]])).item() == pytest.approx(max(-lo, hi), rel=1e-6)  # clipped


def test_quantile_observer_clips_rare_tokens():
    x = torch.randn(1000, 8)
    x[0, 0] = 1000.0
    q = ActQuantizer(QuantSpec(bits=8, observer="quantile", quantile=0.99))
    q(x)
    assert q.hi.item() < 10


def test_uncalibrated_static_quantizer_errors():
    q = ActQuantizer(QuantSpec(bits=8))
    q.mode = "quantize"
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.ones(2, 2))


def test_fake_quant_linear_exact_in_fp_and_shift():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    ref = lin(x)
    f = FakeQuantLinear(lin)
    assert torch.allclose(f(x), ref)
    f.quantize(QuantSpec(bits=8, granularity="per-channel"), QuantSpec(bits=8, granularity="per-token", dynamic=True))
    assert (f(x) - ref).abs().max() < 0.05


@pytest.mark.parametrize("kind", ["opt", "llama", "bert"])
def test_bmm_attention_keeps_the_masks(kind):
    """Routing attention through the BMM fake-quant function must keep transformers' masks (causal for decoders,
    padding for all): with its quantizers off the model computes exactly what it computed before."""
    from osengine.quant.layers import install_bmm_quantization

    from tiny_models import make_model

    model = make_model(kind)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0   # right padding (ignored by the model at real positions)

    def run():
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return out[mask.bool()]

    ref = run()
    layers = model.encoder.layer if kind == "bert" else (
        model.model.decoder.layers if kind == "opt" else model.model.layers)
    install_bmm_quantization(model, [b.attention.self if kind == "bert" else b.self_attn for b in layers],
                             QuantSpec())
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.mode = "off"
    assert torch.allclose(run(), ref, atol=1e-4)
