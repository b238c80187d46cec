"""Bad input raises a clear Python exception naming the argument: ValueError for values and shapes, TypeError for
dtypes and memory layout."""
import numpy as np
import pytest

import osengine


@pytest.fixture
def case():
    x = np.ones((2, 8), dtype=np.float32)
    a = np.ones((2, 8), dtype=np.int8)
    w = osengine.pack_weights(np.ones((3, 8), dtype=np.int8))
    return x, a, w


def test_wrong_dtype(case):
    x, a, w = case
    expected = r"quantize_dynamic: argument 'x': expected dtype float32 or bfloat16, got int8"
    with pytest.raises(TypeError, match=expected):
        osengine.quantize_activations(a)
    with pytest.raises(TypeError, match=r"argument 'a': expected dtype int8, got float32"):
        osengine.gemm(x, w, a_scale=1.0, w_scale=1.0)
    with pytest.raises(TypeError, match=r"argument 'weights': expected dtype int8, got float32"):
        osengine.pack_weights(x)
    with pytest.raises(TypeError, match=r"argument 'x': unsupported numpy dtype float64"):
        osengine.quantize_activations(x.astype(np.float64))


def test_non_contiguous(case):
    x, a, w = case
    with pytest.raises(TypeError, match=r"argument 'x': must be contiguous"):
        osengine.quantize_activations(np.ones((8, 4), dtype=np.float32).T)
    with pytest.raises(TypeError, match=r"argument 'a': must be contiguous"):
        osengine.gemm(np.ones((16, 2), dtype=np.int8)[::2], w, a_scale=1.0, w_scale=1.0)


def test_mismatched_shapes(case):
    x, a, w = case
    with pytest.raises(ValueError, match=r"argument 'a': K mismatch: a has K = 4 but the weights have K = 8"):
        osengine.gemm(np.ones((2, 4), dtype=np.int8), w, a_scale=1.0, w_scale=1.0)
    with pytest.raises(ValueError, match=r"argument 'w_scale': must hold one value, one per output channel"):
        osengine.gemm(a, w, a_scale=1.0, w_scale=np.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"argument 'bias': dimension 0 must be 3"):
        osengine.gemm(a, w, a_scale=1.0, w_scale=1.0, bias=np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"argument 'residual': must have shape \[M, N\] = \[2, 3\]"):
        osengine.gemm(a, w, a_scale=1.0, w_scale=1.0, residual=np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"argument 'x': expected 2 dimensions"):
        osengine.quantize_activations(np.ones(8, np.float32))


def test_k_not_divisible(case):
    x, a, w = case
    with pytest.raises(ValueError, match=r"argument 'codes': last dimension must be even"):
        osengine.pack_int4(np.ones((2, 7), np.int8))
    with pytest.raises(ValueError, match=r"argument 'group_size': must divide K = 8, got 3"):
        osengine.pack_weights(np.ones((3, 8), np.int8), group_size=3)
    expected = r"argument 'group_size': must divide K = 8 \(the last dimension of x\), got 5"
    with pytest.raises(ValueError, match=expected):
        osengine.quantize_activations(x, group_size=5)


def test_empty_tensors(case):
    x, a, w = case
    with pytest.raises(ValueError, match=r"argument 'x': is empty"):
        osengine.quantize_activations(np.ones((0, 8), np.float32))
    with pytest.raises(ValueError, match=r"argument 'a': is empty"):
        osengine.gemm(np.ones((0, 8), np.int8), w, a_scale=1.0, w_scale=1.0)
    with pytest.raises(ValueError, match=r"argument 'weights': is empty"):
        osengine.pack_weights(np.ones((0, 8), np.int8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_activations(case, bad):
    x, a, w = case
    x[1, 5] = bad
    expected = r"argument 'x': contains a non-finite value \(-?(nan|inf)\) at row 1, column 5"
    with pytest.raises(ValueError, match=expected):
        osengine.quantize_activations(x)
    with pytest.raises(ValueError, match=r"argument 'x': contains a non-finite value"):
        osengine.quantize_activations(x, scale=0.1)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_non_positive_scales(case, bad):
    x, a, w = case
    with pytest.raises(ValueError, match=r"argument 'a_scale': must be positive and finite"):
        osengine.gemm(a, w, a_scale=bad, w_scale=1.0)
    with pytest.raises(ValueError, match=r"argument 'w_scale': must be positive and finite"):
        osengine.gemm(a, w, a_scale=1.0, w_scale=[1.0, bad, 1.0])
    with pytest.raises(ValueError, match=r"argument 'delta': must be positive and finite"):
        osengine.quantize_activations(x, scale=bad)
    with pytest.raises(ValueError, match=r"argument 'smooth_scale': must be positive and finite"):
        osengine.quantize_activations(x, smooth_scale=np.full(8, bad, np.float32))

    with pytest.raises(ValueError, match=r"argument 'weight_scale': must be positive and finite"):
        osengine.pack_weights(np.ones((3, 8), np.int8), weight_scale=[1.0, bad, 1.0])


def test_carried_weight_scales(case):
    x, a, w = case
    carried = osengine.pack_weights(np.ones((3, 8), np.int8), weight_scale=[0.5, 1.0, 2.0])
    assert carried.has_weight_scales and not w.has_weight_scales
    with pytest.raises(ValueError, match=r"argument 'w_scale': must not be given: these weights carry their scales"):
        osengine.gemm(a, carried, a_scale=1.0, w_scale=1.0)
    with pytest.raises(ValueError, match=r"argument 'w_scale': is required: these weights carry no scales"):
        osengine.gemm(a, w, a_scale=1.0)
    with pytest.raises(ValueError, match=r"argument 'weight_scale': must hold one value, one per output channel"):
        osengine.pack_weights(np.ones((3, 8), np.int8), weight_scale=[1.0, 1.0])
    np.testing.assert_array_equal(osengine.gemm(a, carried, a_scale=1.0),
                                  osengine.gemm(a, w, a_scale=1.0, w_scale=[0.5, 1.0, 2.0]))


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -3])
def test_bits_out_of_range(case, bits):
    x, a, w = case
    with pytest.raises(ValueError, match=rf"argument 'bits': must be in 2..8, got {bits}"):
        osengine.quantize_activations(x, bits=bits)
    with pytest.raises(ValueError, match=rf"argument 'bits': must be 8 or 4, got {bits}"):
        osengine.pack_weights(np.ones((3, 8), np.int8), bits=bits)


def test_bad_codes_and_names(case):
    x, a, w = case
    bad_w = np.ones((3, 8), np.int8)
    bad_w[2, 1] = -128
    expected = (r"int8 weight codes must lie in \[-127, 127\] \(symmetric quantization\); "
                r"found -128 at row 2, column 1")
    with pytest.raises(ValueError, match=expected):
        osengine.pack_weights(bad_w)
    with pytest.raises(ValueError, match=r"argument 'a_zero_point': values must lie in \[-128, 127\]"):
        osengine.gemm(a, w, a_scale=1.0, w_scale=1.0, a_zero_point=[1000])
    with pytest.raises(ValueError, match=r"unknown activation 'swish'"):
        osengine.gemm(a, w, a_scale=1.0, w_scale=1.0, activation="swish")
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'"):
        osengine.quantize_activations(x, backend="gpu")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not built"):
        osengine.quantize_activations(x, backend="cuda")
    with pytest.raises(TypeError, match=r"argument 'weights': expected PackedWeights"):
        osengine.gemm(a, np.ones((3, 8), np.int8), a_scale=1.0, w_scale=1.0)
    with pytest.raises(ValueError, match=r"argument 'out_codes': is a read-only array"):
        out = np.empty((2, 8), np.int8)
        out.setflags(write=False)
        osengine._C.quantize_dynamic(x, None, None, out, np.empty(2, np.float32), np.empty(2, np.int32), 8, True, 0,
                                     "auto")


def test_fused_rms_norm_arguments(case):
    x, a, w = case
    norm = np.ones(8, np.float32)
    with pytest.raises(ValueError, match=r"argument 'rms_norm_weight': .*8"):
        osengine.quantize_activations(x, rms_norm_weight=np.ones(5, np.float32))
    with pytest.raises(TypeError, match=r"argument 'rms_norm_weight': expected dtype float32"):
        osengine.quantize_activations(x, rms_norm_weight=np.ones(8, np.int32))
    with pytest.raises(ValueError, match=r"argument 'rms_norm_weight': .*finite"):
        osengine.quantize_activations(x, rms_norm_weight=np.full(8, np.nan, np.float32))
    for eps in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=r"argument 'rms_norm_eps': must be positive and finite"):
            osengine.quantize_activations(x, rms_norm_weight=norm, rms_norm_eps=eps)
    for backend in ("reference", "auto"):
        bad = x.copy()
        bad[1, 3] = np.inf
        with pytest.raises(ValueError, match=r"argument 'x': contains a non-finite value \(inf\) at row 1, column 3"):
            osengine.quantize_activations(bad, rms_norm_weight=norm, backend=backend)
        huge = np.full((2, 8), 3e38, np.float32)  # finite, but the sum of squares overflows fp32
        with pytest.raises(ValueError, match=r"argument 'x': the sum of squares of row 0 overflows"):
            osengine.quantize_activations(huge, rms_norm_weight=norm, scale=1.0, backend=backend)


def test_fused_silu_gate_arguments(case):
    x, a, w = case  # x is [2, 8]: gate and up of 4 columns each
    q = osengine.quantize_activations(x, silu_gate=True)
    assert q.codes.shape == (2, 4)
    with pytest.raises(ValueError, match=r"argument 'x': must hold \[gate \| up\] \(an even number of columns\)"):
        osengine.quantize_activations(np.ones((2, 7), np.float32), silu_gate=True)
    with pytest.raises(ValueError, match=r"argument 'shift': .*4"):
        osengine.quantize_activations(x, silu_gate=True, shift=np.zeros(8, np.float32))
    with pytest.raises(ValueError, match=r"argument 'rms_norm_weight': cannot be combined with silu_gate"):
        osengine.quantize_activations(x, silu_gate=True, rms_norm_weight=np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"argument 'group_size': must divide K = 4 \(half the columns of x"):
        osengine.quantize_activations(x, silu_gate=True, group_size=3)
    bad = x.copy()
    bad[1, 6] = np.nan
    with pytest.raises(ValueError, match=r"argument 'x': contains a non-finite value \(nan\) at row 1, column 6"):
        osengine.quantize_activations(bad, silu_gate=True)
