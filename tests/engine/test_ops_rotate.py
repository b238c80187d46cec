"""The engine's online Hadamard rotation (quantize(..., rotate=True)) against its Python definition
(osengine.quant.hadamard): the same orders, the same matrices, the same float32 transform bit for bit, and the codes,
steps and zero points of the front end's quantizers (osengine.quant.spec) applied to hadamard_transform(x)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import osengine  # noqa: E402
from osengine import _C  # noqa: E402
from osengine.engine import ops  # noqa: E402
from osengine.quant.hadamard import (  # noqa: E402
    MAX_BASE_ORDER,
    _base_constructions,
    base_matrix,
    decomposition,
    hadamard_transform,
    is_supported,
)
from osengine.quant.integer_exact import engine_rms_norm, engine_silu  # noqa: E402
from osengine.quant.spec import QuantSpec, centred_codes, dynamic_qparams, qparams_from_range  # noqa: E402

from engine_testing import OPTIMIZED_BACKENDS  # noqa: E402

# Widths of real models and every decomposition shape: Paley I / II bases, Sylvester blocks of 1 .. 4096 values
WIDTHS = [1, 2, 4, 8, 12, 16, 20, 24, 28, 36, 44, 48, 60, 72, 76, 108, 252, 384, 576, 896, 1536, 2048, 4096, 4864,
          5632, 14336]
BACKENDS = ["reference"] + OPTIMIZED_BACKENDS


def rows(k, m=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed * 7919 + k)
    x = torch.randn(m, k, generator=g) * scale
    x[:, torch.randint(0, k, (max(1, k // 64),), generator=g)] += 40.0  # outlier channels, as rotations meet them
    return x


def test_supported_orders_are_the_python_ones():
    for n in range(0, 4097):
        assert _C.is_hadamard_order(n) == (n >= 1 and is_supported(n)), n
    for n in (11008, 14336, 4864, 5632, 28672, 172 * 64):
        assert _C.is_hadamard_order(n) == is_supported(n), n
    assert ops.is_hadamard_order(1536) and not ops.is_hadamard_order(11008)


@pytest.mark.parametrize("k", WIDTHS + [n for n in range(1, 300) if is_supported(n) and n not in WIDTHS])
def test_engine_transform_equals_the_python_transform(k):
    x = rows(k)
    out = torch.empty_like(x)
    _C.hadamard_transform(x, out)
    assert torch.equal(out, hadamard_transform(x))
    np.testing.assert_array_equal(ops.hadamard_transform(x.numpy()), hadamard_transform(x).numpy())
    x[2, k // 2] = float("inf")  # non-finite values propagate as in the Python transform (no check)
    _C.hadamard_transform(x, out)
    assert torch.equal(out.isfinite(), hadamard_transform(x).isfinite())


@pytest.mark.parametrize("m", [1] + sorted(_base_constructions()))
def test_base_matrices_through_the_transform_of_identity_rows(m):
    # K = m * p for the smallest p that makes m the decomposition's base: rows e_{a p} of the identity come out as
    # row a of H_m (Kronecker a row of ones), times float32(1 / sqrt(K)); K = m itself when m is a base there.
    p = 1
    while decomposition(m * p) != (m, p):
        p *= 2
        if p > 64:
            pytest.skip(f"{m} is never the base of a decomposition (a smaller base with a longer Sylvester block wins)")
    k = m * p
    eye = torch.eye(k)[::p].contiguous()  # e_0, e_p, e_2p, ...
    out = torch.empty_like(eye)
    _C.hadamard_transform(eye, out)
    scale = torch.tensor(1.0 / k ** 0.5, dtype=torch.float32)
    want = torch.kron(base_matrix(m).float(), torch.ones(1, p)) * scale
    assert torch.equal(out, want)
    assert torch.equal(out, hadamard_transform(eye))


def test_every_base_order_below_the_limit_is_used_or_shadowed():
    # the orders the test above skips are Paley orders m = 2^j m' with a base m' (e.g. 24 = 2 * 12): the engine
    # builds H_m' for them, as quant/hadamard.py's decomposition does
    for m in _base_constructions():
        assert m <= MAX_BASE_ORDER
        assert decomposition(m)[0] <= m


def engine_centred(q, k, groups):
    codes = torch.as_tensor(np.asarray(q.codes)).float()
    zp = torch.as_tensor(np.asarray(q.zero_point)).float().reshape(codes.shape[0], -1)
    return (codes.reshape(codes.shape[0], groups, -1) - zp[:, :, None]).reshape(codes.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [12, 28, 36, 64, 576, 1536, 4096])
@pytest.mark.parametrize("bits,symmetric,granularity", [(8, False, "per-token"), (8, True, "per-token"),
                                                        (4, False, "per-group"), (6, True, "per-group"),
                                                        (2, False, "per-token")])
def test_rotated_codes_equal_the_fake_quant_of_the_rotated_activations(backend, k, bits, symmetric, granularity):
    group = k // 4 if granularity == "per-group" else 0
    spec = QuantSpec(bits, symmetric, granularity, group_size=group or None, dynamic=True)
    x = rows(k, m=17, seed=bits)
    r = hadamard_transform(x)
    # dynamic: the front end's ranges, steps and zero points of the rotated activations
    xg, delta, zp = dynamic_qparams(r, spec)
    want = centred_codes(xg, delta, zp, spec).reshape_as(r)
    q = osengine.quantize_activations(x, bits=bits, symmetric=symmetric, group_size=group, backend=backend,
                                      rotate=True)
    groups = k // group if group else 1
    assert torch.equal(engine_centred(q, k, groups), want)
    assert torch.equal(q.scale.reshape(-1), delta.reshape(-1))
    # static: a calibrated range (narrower than the data: clamping included), the engine's signed zero point
    lo, hi = r.min() * 0.7, r.max() * 0.7
    delta, zp = qparams_from_range(lo, hi, spec)
    offset = 0 if symmetric else 2 ** (bits - 1)
    q = osengine.quantize_activations(x, bits=bits, symmetric=symmetric, backend=backend, rotate=True,
                                      scale=delta.reshape(1), zero_point=(zp.reshape(1) - offset).to(torch.int32))
    assert torch.equal(torch.as_tensor(q.codes).float() - (zp - offset), centred_codes(r, delta, zp, spec))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [12, 24, 1536])
@pytest.mark.parametrize("prologue", ["silu_gate", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_after_the_fused_prologue_and_before_the_shift(backend, k, prologue, dtype):
    # silu_gate: LLaMA's down_proj input silu(gate) * up, rotated; rms_norm: a rotated norm reader. Then the shift and
    # the smooth scale, then the quantizer: the codes of hadamard_transform(prologue(x)) shifted and scaled.
    g = torch.Generator().manual_seed(k)
    x = rows(2 * k if prologue == "silu_gate" else k, m=9).to(dtype)
    shift, smooth = torch.randn(k, generator=g), torch.rand(k, generator=g) + 0.5
    kwargs = {"silu_gate": True} if prologue == "silu_gate" else {"rms_norm_weight": torch.rand(k, generator=g) + 0.5,
                                                                  "rms_norm_eps": 1e-5}
    if prologue == "silu_gate":
        y = engine_silu(x[:, :k].float()) * x[:, k:].float()
    else:
        y = engine_rms_norm(x.float(), kwargs["rms_norm_weight"], 1e-5)
    r = (hadamard_transform(y) - shift) / smooth
    want = osengine.quantize_activations(r.contiguous(), bits=8, symmetric=False, backend="reference")
    got = osengine.quantize_activations(x, bits=8, symmetric=False, shift=shift, smooth_scale=smooth, rotate=True,
                                        backend=backend, **kwargs)
    for a, b in zip(got, want):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_unsupported_widths_are_clear_errors():
    for k in (3, 6, 11008):
        with pytest.raises(ValueError, match=rf"quantize_dynamic: argument 'rotate': no Hadamard matrix of order "
                                             rf"K = {k} \(the last dimension of x\) is constructed here; supported "
                                             rf"orders are m \* 2\^k with m = 1 or a Paley order <= 256"):
            osengine.quantize_activations(torch.ones(2, k), rotate=True)
        with pytest.raises(ValueError, match=f"hadamard_transform: argument 'x': no Hadamard matrix of order K = {k}"):
            _C.hadamard_transform(torch.ones(2, k), torch.empty(2, k))
    with pytest.raises(ValueError, match=r"K = 11008 \(half the columns of x: silu_gate\)"):
        osengine.quantize_activations(torch.ones(2, 2 * 11008), rotate=True, silu_gate=True, scale=0.1)
    with pytest.raises(ValueError, match="argument 'rotate': the Hadamard rotation"):
        osengine.quantize_activations(torch.full((2, 16), 3e38), rotate=True)
    with pytest.raises(TypeError, match="argument 'x'"):
        _C.hadamard_transform(torch.ones(2, 4, dtype=torch.float64), torch.empty(2, 4))
