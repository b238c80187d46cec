"""Every optimized op against the scalar reference (bit-exact integers, floats within 1e-6 relative), and the
reference against an independent numpy oracle."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import osengine

from engine_testing import OPTIMIZED_BACKENDS, activations

SIZES = [1, 3, 17, 64, 4095]
ACTIVATIONS = ["none", "relu", "gelu", "gelu_tanh", "silu"]
HYPOTHESIS_EXAMPLES = int(os.environ.get("OSENGINE_HYPOTHESIS_EXAMPLES", "30"))
settings.register_profile("engine", max_examples=HYPOTHESIS_EXAMPLES, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("engine")


def numpy_quantize(y, scale, zero_point, qmin, qmax):
    """The documented formula, in float32 like the engine: clamp(round_half_even(y / scale) + zp)."""
    v = np.round(y / np.float32(scale)).astype(np.float32) + np.float32(zero_point)
    return np.clip(v, qmin, qmax).astype(np.int8)


def weight_codes(rng, n, k, bits):
    hi = 127 if bits == 8 else 7
    lo = -127 if bits == 8 else -8
    return rng.integers(lo, hi + 1, size=(n, k), dtype=np.int8)


def pack(codes, bits, group_size=0, backend="auto", weight_scale=None):
    data = codes if bits == 8 else osengine.pack_int4(codes)
    return osengine.pack_weights(data, bits=bits, group_size=group_size, backend=backend, weight_scale=weight_scale)


# ---------------------------------------------------------------- quantize

@given(m=st.sampled_from(SIZES), k=st.sampled_from(SIZES), bits=st.integers(2, 8), symmetric=st.booleans(),
       fused=st.booleans(), seed=st.integers(0, 2**31))
def test_quantize_dynamic_reference_matches_numpy(m, k, bits, symmetric, fused, seed):
    assume(m * k <= 300_000)
    rng = np.random.default_rng(seed)
    x = activations(rng, m, k)
    shift = rng.standard_normal(k).astype(np.float32) if fused else None
    smooth = rng.uniform(0.5, 4.0, k).astype(np.float32) if fused else None
    q = osengine.quantize_activations(x, bits=bits, symmetric=symmetric, shift=shift, smooth_scale=smooth,
                                      backend="reference")
    y = x if not fused else (x - shift) / smooth
    qmin, qmax = osengine.code_range(bits, symmetric)
    lo = np.minimum(y.min(axis=1), 0).astype(np.float32)
    hi = np.maximum(y.max(axis=1), 0).astype(np.float32)
    if symmetric:
        scale = np.maximum(-lo, hi) / np.float32(qmax)
    else:
        scale = (hi - lo) / np.float32(qmax - qmin)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    np.testing.assert_array_equal(q.scale, scale)
    for row in range(m):
        np.testing.assert_array_equal(q.codes[row], numpy_quantize(y[row], scale[row], q.zero_point[row], qmin, qmax))


def assert_codes_within_one(q, y, symmetric):
    """q (8-bit, per-row scales) against numpy quantizing y with q's own scales and zero points: a prologue computed
    in float64 by numpy may put a value on the other side of a rounding boundary, so codes may differ by one."""
    qmin, qmax = osengine.code_range(8, symmetric)
    want = np.stack([numpy_quantize(y[r], q.scale[r], q.zero_point[r], qmin, qmax) for r in range(len(y))])
    diff = np.abs(want.astype(np.int32) - np.asarray(q.codes, dtype=np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


@given(m=st.sampled_from(SIZES), k=st.sampled_from(SIZES), symmetric=st.booleans(), fused=st.booleans(),
       seed=st.integers(0, 2**31))
def test_quantize_with_rms_norm_reference_matches_numpy(m, k, symmetric, fused, seed):
    """The fused RMSNorm: y = w * (x / sqrt(mean(x^2) + eps)) before the shift and scale. numpy computes the norm in
    float64, the engine in fp32, so codes may differ by one where y sits at a rounding boundary."""
    assume(m * k <= 300_000)
    rng = np.random.default_rng(seed)
    x = activations(rng, m, k)
    w = rng.uniform(0.2, 3.0, k).astype(np.float32)
    shift = rng.standard_normal(k).astype(np.float32) if fused else None
    smooth = rng.uniform(0.5, 4.0, k).astype(np.float32) if fused else None
    q = osengine.quantize_activations(x, bits=8, symmetric=symmetric, shift=shift, smooth_scale=smooth,
                                      rms_norm_weight=w, rms_norm_eps=1e-5, backend="reference")
    x64 = x.astype(np.float64)
    y = (w * (x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-5))).astype(np.float32)
    assert_codes_within_one(q, (y - shift) / smooth if fused else y, symmetric)


@given(m=st.sampled_from(SIZES), k=st.sampled_from(SIZES), symmetric=st.booleans(), fused=st.booleans(),
       seed=st.integers(0, 2**31))
def test_quantize_with_silu_gate_reference_matches_numpy(m, k, symmetric, fused, seed):
    """The fused SiLU gate: x = [gate | up], quantize silu(gate) * up. numpy's exp is not osengine's (< 2e-7 relative
    apart), so codes may differ by one where the product sits at a rounding boundary."""
    assume(m * k <= 300_000)
    rng = np.random.default_rng(seed)
    x = activations(rng, m, 2 * k)
    shift = rng.standard_normal(k).astype(np.float32) if fused else None
    smooth = rng.uniform(0.5, 4.0, k).astype(np.float32) if fused else None
    q = osengine.quantize_activations(x, bits=8, symmetric=symmetric, shift=shift, smooth_scale=smooth,
                                      silu_gate=True, backend="reference")
    assert q.codes.shape == (m, k)
    g, u = x[:, :k].astype(np.float64), x[:, k:].astype(np.float64)
    y = (g / (1 + np.exp(-g)) * u).astype(np.float32)
    assert_codes_within_one(q, (y - shift) / smooth if fused else y, symmetric)


@pytest.mark.parametrize("backend", OPTIMIZED_BACKENDS)
@given(m=st.sampled_from(SIZES), k=st.sampled_from(SIZES), bits=st.integers(2, 8), symmetric=st.booleans(),
       fused=st.booleans(), group=st.sampled_from([0, 1, 3, 32]), static=st.booleans(), bf16=st.booleans(),
       prologue=st.sampled_from([None, "rms_norm", "silu_gate"]), seed=st.integers(0, 2**31))
def test_quantize_optimized_matches_reference(backend, m, k, bits, symmetric, fused, group, static, bf16, prologue,
                                              seed):
    assume(m * k <= 2_000_000)
    assume(group == 0 or k % group == 0)
    rng = np.random.default_rng(seed)
    x = activations(rng, m, 2 * k if prologue == "silu_gate" else k)
    if bf16:
        torch = pytest.importorskip("torch")
        x = torch.from_numpy(x).to(torch.bfloat16)
    kwargs = dict(bits=bits, symmetric=symmetric, group_size=group)
    if fused:
        kwargs["shift"] = rng.standard_normal(k).astype(np.float32)
        kwargs["smooth_scale"] = rng.uniform(0.5, 4.0, k).astype(np.float32)
    if prologue == "rms_norm":
        kwargs["rms_norm_weight"] = rng.uniform(0.2, 3.0, k).astype(np.float32)
        kwargs["rms_norm_eps"] = 1e-6
    if prologue == "silu_gate":
        kwargs["silu_gate"] = True
    if static:
        groups = k // group if group else 1
        kwargs["scale"] = rng.uniform(0.01, 0.5, groups).astype(np.float32)
        if not symmetric:
            qmin, qmax = osengine.code_range(bits, symmetric)
            kwargs["zero_point"] = rng.integers(qmin, qmax + 1, groups).astype(np.int32)
    want = osengine.quantize_activations(x, backend="reference", **kwargs)
    got = osengine.quantize_activations(x, backend=backend, **kwargs)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ---------------------------------------------------------------- GEMM

def gemm_case(rng, m, n, k, bits, a_bits, group):
    a_hi = 127 if a_bits == 8 else 7
    a = rng.integers(-a_hi - 1, a_hi + 1, size=(m, k), dtype=np.int8)
    w = weight_codes(rng, n, k, bits)
    return a, w


@given(m=st.sampled_from(SIZES), n=st.sampled_from(SIZES), k=st.sampled_from(SIZES + [2, 4096]),
       kind=st.sampled_from(["w8a8", "w4a8", "w4a4"]), seed=st.integers(0, 2**31))
def test_accumulators_reference_matches_numpy(m, n, k, kind, seed):
    assume(m * n * k <= 3_000_000)
    assume(kind == "w8a8" or k % 2 == 0)
    rng = np.random.default_rng(seed)
    bits, a_bits = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}[kind]
    a, w = gemm_case(rng, m, n, k, bits, a_bits, 0)
    packed = pack(w, bits, backend="reference")
    a_in = osengine.pack_int4(a) if a_bits == 4 else a
    acc = osengine.gemm_accumulate(a_in, packed, a_format="int4_packed" if a_bits == 4 else "int8")
    np.testing.assert_array_equal(acc, a.astype(np.int64) @ w.astype(np.int64).T)


@pytest.mark.parametrize("backend", OPTIMIZED_BACKENDS)
@given(m=st.sampled_from(SIZES), n=st.sampled_from(SIZES), k=st.sampled_from(SIZES + [2, 4096]),
       kind=st.sampled_from(["w8a8", "w4a8", "w4a4"]), seed=st.integers(0, 2**31))
def test_accumulators_optimized_match_reference(backend, m, n, k, kind, seed):
    assume(m * n * k <= 20_000_000)
    assume(kind == "w8a8" or k % 2 == 0)
    rng = np.random.default_rng(seed)
    bits, a_bits = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}[kind]
    a, w = gemm_case(rng, m, n, k, bits, a_bits, 0)
    a_in = osengine.pack_int4(a) if a_bits == 4 else a
    fmt = "int4_packed" if a_bits == 4 else "int8"
    want = osengine.gemm_accumulate(a_in, pack(w, bits, backend="reference"), a_format=fmt)
    got = osengine.gemm_accumulate(a_in, pack(w, bits, backend=backend), a_format=fmt)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", OPTIMIZED_BACKENDS)
@given(m=st.sampled_from(SIZES), n=st.sampled_from(SIZES), k=st.sampled_from([32, 64, 128, 4096, 17, 3]),
       kind=st.sampled_from(["w8a8", "w4a8", "w4a4"]), group=st.sampled_from([0, 32, 64, 128]),
       activation=st.sampled_from(ACTIVATIONS), per_token=st.booleans(), zero_point=st.booleans(),
       bias=st.booleans(), residual=st.sampled_from([None, "float32", "bfloat16"]),
       out_dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 2**31))
def test_gemm_optimized_matches_reference(backend, m, n, k, kind, group, activation, per_token, zero_point, bias,
                                          residual, out_dtype, seed):
    assume(m * n * k <= 20_000_000)
    assume(group == 0 or k % group == 0)
    assume(kind == "w8a8" or k % 2 == 0)
    if out_dtype == "bfloat16" or residual == "bfloat16":
        torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    bits, a_bits = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}[kind]
    a, w = gemm_case(rng, m, n, k, bits, a_bits, group)
    groups = k // group if group else 1
    a_scale_shape = (m, groups) if (per_token and groups > 1) else ((m,) if per_token else (1,))
    a_scale = rng.uniform(0.01, 0.1, a_scale_shape).astype(np.float32)
    w_scale = rng.uniform(1e-3, 1e-2, (n, groups) if groups > 1 else (n,)).astype(np.float32)
    zp_hi = 127 if a_bits == 8 else 7
    zp = rng.integers(-zp_hi - 1, zp_hi + 1, a_scale_shape).astype(np.int32) if zero_point else None
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    r = rng.standard_normal((m, n)).astype(np.float32) if residual else None
    a_in = osengine.pack_int4(a) if a_bits == 4 else a
    if out_dtype == "bfloat16" or residual == "bfloat16":
        a_in = torch.from_numpy(a_in)
        if r is not None:
            r = torch.from_numpy(r).to(getattr(torch, residual))
    fn = osengine.gemm_w4a4 if a_bits == 4 else osengine.gemm
    kwargs = dict(a_scale=a_scale, w_scale=w_scale, a_zero_point=zp, bias=b, residual=r, activation=activation,
                  out_dtype=out_dtype)
    want = fn(a_in, pack(w, bits, group, backend="reference"), **kwargs)
    got = fn(a_in, pack(w, bits, group, backend=backend), **kwargs)
    # The same scales carried by the packed weights (the backend may rearrange them): the same bits.
    carried = fn(a_in, pack(w, bits, group, backend=backend, weight_scale=w_scale), **{**kwargs, "w_scale": None})
    if out_dtype == "bfloat16":
        want, got, carried = want.float().numpy(), got.float().numpy(), carried.float().numpy()
    want, got = np.asarray(want), np.asarray(got)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(want).max())))
    np.testing.assert_array_equal(np.asarray(carried), got)


def test_gemm_reference_epilogue_matches_numpy(rng):
    m, n, k = 5, 7, 96
    x = activations(rng, m, k)
    w_float = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    w_scale = (np.abs(w_float).max(axis=1) / 127).astype(np.float32)
    w = np.round(w_float / w_scale[:, None]).astype(np.int8)
    bias = rng.standard_normal(n).astype(np.float32)
    q = osengine.quantize_activations(x, bits=8, symmetric=False, backend="reference")
    y = osengine.gemm(q.codes, pack(w, 8, backend="reference"), a_scale=q.scale, w_scale=w_scale,
                      a_zero_point=q.zero_point, bias=bias)
    dequant_a = q.scale[:, None].astype(np.float64) * (q.codes.astype(np.float64) - q.zero_point[:, None])
    want = dequant_a @ (w.astype(np.float64) * w_scale[:, None]).T + bias
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference"] + OPTIMIZED_BACKENDS)
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 32), (8, 64)])
def test_pack_unpack_round_trip(rng, backend, bits, group):
    w = weight_codes(rng, 37, 256, bits)
    packed = pack(w, bits, group, backend=backend)
    out = np.empty_like(w)
    packed.unpack(out)
    np.testing.assert_array_equal(out, w)
    np.testing.assert_array_equal(packed.column_sums(), osengine.column_sums(w, group))
    assert packed.backend == backend


def test_int4_pack_layout(rng):
    codes = np.array([[1, -2, 7, -8]], dtype=np.int8)
    packed = osengine.pack_int4(codes)
    np.testing.assert_array_equal(packed, np.array([[0xE1, 0x87]], dtype=np.uint8))
    np.testing.assert_array_equal(osengine.unpack_int4(packed), codes)


def test_auto_backend_is_the_fastest_available():
    want = "avx512_vnni" if osengine.cpu_has_avx512_vnni() else "avx2" if osengine.cpu_has_avx2() else "reference"
    assert osengine.best_cpu_backend() == want
    w = np.ones((4, 8), dtype=np.int8)
    assert osengine.pack_weights(w).backend == osengine.best_cpu_backend()


@pytest.mark.parametrize("value", ["reference", "avx2", "avx512_vnni", "auto", "", "avx9"])
def test_cpu_backend_environment_variable_chooses_auto(monkeypatch, value):
    """OSENGINE_CPU_BACKEND decides what 'auto' packs for (read at each resolution): a backend this CPU runs, a clear
    error for one it cannot run or an unknown name, the fastest for 'auto' or empty."""
    fastest = osengine.best_cpu_backend()
    monkeypatch.setenv("OSENGINE_CPU_BACKEND", value)
    w = np.ones((4, 8), dtype=np.int8)
    if value in ("auto", ""):
        assert osengine.pack_weights(w).backend == fastest
    elif value == "avx9":
        with pytest.raises(ValueError, match=r"OSENGINE_CPU_BACKEND.*'avx9'.*expected 'auto', 'reference', 'avx2'"):
            osengine.pack_weights(w)
    elif value in osengine.registered_backends():
        assert osengine.best_cpu_backend() == value
        assert osengine.pack_weights(w).backend == value
    else:
        with pytest.raises(RuntimeError, match=f"backend '{value}' needs a CPU with"):
            osengine.pack_weights(w)
