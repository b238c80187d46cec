"""The CUDA backend against the scalar reference on the CPU: every op, many shapes, the same bits.

The CUDA kernels replay the reference's fp32 arithmetic operation by operation (round-to-nearest intrinsics, no
contraction), so outputs are compared for equality, not closeness. Skipped without a GPU or without the CUDA backend
in this build. The cases marked `sanitize` (each kernel kind once: tensor-core tiles for decode and prefill, the
fallback, groups, quantize with and without the rotation) are the subset that benchmarks/gpu_check.py runs under
compute-sanitizer; by hand:

    compute-sanitizer --tool memcheck python -m pytest -q -m sanitize tests/engine/test_ops_cuda.py
"""
import numpy as np
import pytest

import osengine
from osengine.ops import has_cuda_backend

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    not (has_cuda_backend() and torch.cuda.is_available()),
    reason="needs a GPU and osengine built with the CUDA backend",
)

DEVICE = "cuda"
ACTIVATIONS = ["none", "relu", "gelu", "gelu_tanh", "silu"]


def sanitized(cases, chosen):
    """`cases` with those in `chosen` marked for the compute-sanitizer subset."""
    missing = set(chosen) - set(cases)
    assert not missing, f"sanitize subset names cases that are not tested: {missing}"
    return [pytest.param(*case, marks=pytest.mark.sanitize) if case in chosen else case for case in cases]


def cuda(array):
    return torch.from_numpy(np.ascontiguousarray(array)).to(DEVICE)


def host(tensor):
    torch.cuda.synchronize()
    if tensor.dtype == torch.bfloat16:
        return tensor.cpu()
    return tensor.cpu().numpy()


def int8_weights(rng, n, k):
    return rng.integers(-127, 128, size=(n, k), dtype=np.int8)


def int4_codes(rng, rows, k):
    return rng.integers(-8, 8, size=(rows, k), dtype=np.int8)


# ---- GEMM shapes ----------------------------------------------------------------------------------------------------
# Tensor-core paths need K % 16 (int8) / K % 32 (int4) and N % 4; the rest exercise the CUDA-core fallback.
SHAPES_INT8 = [
    (1, 16, 64), (1, 4, 16), (3, 17, 32), (17, 3, 17), (1, 1, 1), (3, 3, 3), (17, 17, 17),
    (16, 64, 128), (64, 96, 256), (65, 128, 512), (128, 256, 1024), (200, 72, 4096),
    (4095, 16, 64), (3, 4095, 32), (5, 20, 4095), (2, 4096, 4096),
]
SHAPES_INT4 = [
    (1, 16, 64), (3, 17, 32), (17, 3, 18), (1, 1, 2), (16, 64, 128), (65, 128, 512), (128, 256, 1024),
    (4095, 16, 64), (3, 4095, 32), (5, 20, 4094),
]


def reference_gemm(a, w, bits, group_size, a_format, **kwargs):
    packed = osengine.pack_weights(w, bits=bits, group_size=group_size, backend="reference")
    if a_format == "int4_packed":
        return osengine.gemm_w4a4(a, packed, **kwargs)
    return osengine.gemm(a, packed, **kwargs)


def cuda_gemm(a, w, bits, group_size, a_format, **kwargs):
    packed = osengine.pack_weights(cuda(w), bits=bits, group_size=group_size, backend="cuda")
    assert packed.backend == "cuda"
    converted = {key: (cuda(value) if isinstance(value, np.ndarray) else value) for key, value in kwargs.items()}
    if a_format == "int4_packed":
        return osengine.gemm_w4a4(cuda(a), packed, **converted)
    return osengine.gemm(cuda(a), packed, **converted)


def epilogue_inputs(rng, m, n, groups):
    shape_m = (m, groups) if groups > 1 else (m,)
    shape_n = (n, groups) if groups > 1 else (n,)
    return dict(
        a_scale=rng.uniform(0.001, 0.1, size=shape_m).astype(np.float32),
        a_zero_point=rng.integers(-8, 8, size=shape_m, dtype=np.int32),
        w_scale=rng.uniform(0.001, 0.05, size=shape_n).astype(np.float32),
        bias=rng.standard_normal(n).astype(np.float32),
        residual=rng.standard_normal((m, n)).astype(np.float32),
    )


@pytest.mark.parametrize("m,n,k", SHAPES_INT8)
def test_w8a8_accumulators(rng, m, n, k):
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    w = int8_weights(rng, n, k)
    want = osengine.gemm_accumulate(a, osengine.pack_weights(w, backend="reference"))
    got = osengine.gemm_accumulate(cuda(a), osengine.pack_weights(cuda(w), backend="cuda"))
    np.testing.assert_array_equal(host(got), want)


@pytest.mark.parametrize("m,n,k", sanitized(SHAPES_INT8, [(16, 64, 128), (65, 128, 512), (17, 3, 17)]))
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_w8a8_epilogue(rng, m, n, k, activation):
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    w = int8_weights(rng, n, k)
    inputs = epilogue_inputs(rng, m, n, 1)
    want = reference_gemm(a, w, 8, 0, "int8", activation=activation, **inputs)
    got = cuda_gemm(a, w, 8, 0, "int8", activation=activation, **inputs)
    np.testing.assert_array_equal(host(got), want)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16", "float16"])
def test_w8a8_activations_and_output_dtypes(rng, activation, out_dtype):
    m, n, k = 33, 64, 256
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    w = int8_weights(rng, n, k)
    inputs = epilogue_inputs(rng, m, n, 1)
    want = reference_gemm(a, w, 8, 0, "int8", activation=activation, **inputs)
    got = cuda_gemm(a, w, 8, 0, "int8", activation=activation, out_dtype=out_dtype, **inputs)
    expected = torch.from_numpy(want).to(getattr(torch, out_dtype))  # round-to-nearest-even, as the kernel
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("scalar_a,scalar_w", [(True, True), (True, False), (False, True)])
def test_w8a8_scalar_scales_and_optional_terms(rng, scalar_a, scalar_w):
    m, n, k = 7, 48, 96
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    w = int8_weights(rng, n, k)
    kwargs = dict(a_scale=0.02 if scalar_a else rng.uniform(0.01, 0.1, m).astype(np.float32),
                  w_scale=0.03 if scalar_w else rng.uniform(0.01, 0.1, n).astype(np.float32))
    want = reference_gemm(a, w, 8, 0, "int8", **kwargs)
    got = cuda_gemm(a, w, 8, 0, "int8", **kwargs)
    np.testing.assert_array_equal(host(got), want)


def test_bf16_residual(rng):
    m, n, k = 9, 32, 64
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    w = int8_weights(rng, n, k)
    residual = torch.randn(m, n).to(torch.bfloat16)
    want = osengine.gemm(a, osengine.pack_weights(w, backend="reference"), a_scale=0.01, w_scale=0.02,
                         residual=residual)
    got = osengine.gemm(cuda(a), osengine.pack_weights(cuda(w), backend="cuda"), a_scale=0.01, w_scale=0.02,
                        residual=residual.to(DEVICE))
    np.testing.assert_array_equal(host(got), want)


@pytest.mark.parametrize("m,n,k,group_size", sanitized([(3, 16, 128, 32), (17, 64, 256, 64), (64, 32, 512, 128),
                                                        (5, 12, 96, 6), (2, 4, 64, 16)], [(17, 64, 256, 64)]))
def test_w8a8_groups(rng, m, n, k, group_size):
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    w = int8_weights(rng, n, k)
    inputs = epilogue_inputs(rng, m, n, k // group_size)
    want = reference_gemm(a, w, 8, group_size, "int8", activation="gelu", **inputs)
    got = cuda_gemm(a, w, 8, group_size, "int8", activation="gelu", **inputs)
    np.testing.assert_array_equal(host(got), want)


@pytest.mark.parametrize("m,n,k", sanitized(SHAPES_INT4, [(65, 128, 512), (3, 17, 32)]))
def test_w4a8(rng, m, n, k):
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    w = osengine.pack_int4(int4_codes(rng, n, k))
    inputs = epilogue_inputs(rng, m, n, 1)
    want = reference_gemm(a, w, 4, 0, "int8", **inputs)
    got = cuda_gemm(a, w, 4, 0, "int8", **inputs)
    np.testing.assert_array_equal(host(got), want)


@pytest.mark.parametrize("m,n,k", sanitized(SHAPES_INT4, [(65, 128, 512)]))
def test_w4a4(rng, m, n, k):
    a = osengine.pack_int4(int4_codes(rng, m, k))
    w = osengine.pack_int4(int4_codes(rng, n, k))
    inputs = epilogue_inputs(rng, m, n, 1)
    want = reference_gemm(a, w, 4, 0, "int4_packed", activation="relu", **inputs)
    got = cuda_gemm(a, w, 4, 0, "int4_packed", activation="relu", **inputs)
    np.testing.assert_array_equal(host(got), want)
    acc_want = osengine.gemm_accumulate(a, osengine.pack_weights(w, bits=4, backend="reference"),
                                        a_format="int4_packed")
    acc_got = osengine.gemm_accumulate(cuda(a), osengine.pack_weights(cuda(w), bits=4, backend="cuda"),
                                       a_format="int4_packed")
    np.testing.assert_array_equal(host(acc_got), acc_want)


@pytest.mark.parametrize("bits,a_format,group_size", [(4, "int8", 32), (4, "int4_packed", 64), (4, "int8", 2)])
def test_int4_groups(rng, bits, a_format, group_size):
    m, n, k = 9, 40, 256
    if a_format == "int4_packed":
        a = osengine.pack_int4(int4_codes(rng, m, k))
    else:
        a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    w = osengine.pack_int4(int4_codes(rng, n, k))
    inputs = epilogue_inputs(rng, m, n, k // group_size)
    want = reference_gemm(a, w, bits, group_size, a_format, **inputs)
    got = cuda_gemm(a, w, bits, group_size, a_format, **inputs)
    np.testing.assert_array_equal(host(got), want)


@pytest.mark.sanitize
def test_unaligned_operands_take_the_fallback(rng):
    # A contiguous view one byte into a buffer: not 16-byte aligned, so the tensor-core kernel must not be used.
    m, n, k = 16, 64, 128
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    w = int8_weights(rng, n, k)
    buffer = torch.empty(m * k + 1, dtype=torch.int8, device=DEVICE)
    a_view = buffer[1:].view(m, k)
    a_view.copy_(cuda(a))
    packed = osengine.pack_weights(cuda(w), backend="cuda")
    got = osengine.gemm_accumulate(a_view, packed)
    want = osengine.gemm_accumulate(a, osengine.pack_weights(w, backend="reference"))
    np.testing.assert_array_equal(host(got), want)
    # An output 4 bytes into its buffer: aligned operands, unaligned int32 store.
    out_buffer = torch.empty(m * n + 1, dtype=torch.int32, device=DEVICE)
    out_view = out_buffer[1:].view(m, n)
    osengine.gemm_accumulate(cuda(a), packed, out=out_view)
    np.testing.assert_array_equal(host(out_view), want)


def test_packed_weights_round_trip(rng):
    w = int8_weights(rng, 24, 80)
    packed = osengine.pack_weights(w, backend="cuda")  # host codes, device layout
    assert packed.backend == "cuda" and packed.nbytes == w.size
    out = np.empty_like(w)
    packed.unpack(out)
    np.testing.assert_array_equal(out, w)
    np.testing.assert_array_equal(packed.column_sums(), osengine.column_sums(w))
    codes = int4_codes(rng, 6, 34)
    packed4 = osengine.pack_weights(cuda(osengine.pack_int4(codes)), bits=4, group_size=2, backend="cuda")
    out4 = np.empty_like(codes)
    packed4.unpack(out4)
    np.testing.assert_array_equal(out4, codes)


@pytest.mark.sanitize
def test_runs_on_the_current_stream(rng):
    m, n, k = 64, 128, 256
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    w = int8_weights(rng, n, k)
    packed = osengine.pack_weights(cuda(w), backend="cuda")
    want = osengine.gemm(a, osengine.pack_weights(w, backend="reference"), a_scale=0.01, w_scale=0.02)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        a_gpu = cuda(a)
        got = osengine.gemm(a_gpu, packed, a_scale=0.01, w_scale=0.02)
    stream.synchronize()
    np.testing.assert_array_equal(got.cpu().numpy(), want)


# ---- activation quantization ----------------------------------------------------------------------------------------
QUANT_SHAPES = [(1, 1), (1, 16), (3, 17), (17, 64), (4095, 32), (2, 4095), (8, 4096), (1, 20000)]


@pytest.mark.parametrize("m,k", sanitized(QUANT_SHAPES, [(17, 64)]))
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, False), (2, True)])
def test_quantize_dynamic(rng, m, k, bits, symmetric):
    x = rng.standard_normal((m, k)).astype(np.float32) * 3 + 0.5
    shift = rng.standard_normal(k).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, k).astype(np.float32)
    want = osengine.quantize_activations(x, bits=bits, symmetric=symmetric, shift=shift, smooth_scale=scale,
                                         backend="reference")
    got = osengine.quantize_activations(cuda(x), bits=bits, symmetric=symmetric, shift=cuda(shift),
                                        smooth_scale=cuda(scale))
    np.testing.assert_array_equal(host(got.codes), want.codes)
    np.testing.assert_array_equal(host(got.scale), want.scale)
    np.testing.assert_array_equal(host(got.zero_point), want.zero_point)


@pytest.mark.parametrize("m,k", QUANT_SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_static(rng, m, k, symmetric):
    x = rng.standard_normal((m, k)).astype(np.float32) * 2
    want = osengine.quantize_activations(x, symmetric=symmetric, backend="reference", scale=np.float32(0.03),
                                         zero_point=None if symmetric else np.int32(-5))
    got = osengine.quantize_activations(
        cuda(x), symmetric=symmetric,
        scale=torch.tensor([0.03], device=DEVICE),
        zero_point=None if symmetric else torch.tensor([-5], dtype=torch.int32, device=DEVICE))
    np.testing.assert_array_equal(host(got.codes), want.codes)


@pytest.mark.parametrize("group_size", [2, 16, 96, 384])
def test_quantize_groups(rng, group_size):
    m, k = 5, 768
    x = rng.standard_normal((m, k)).astype(np.float32)
    want = osengine.quantize_activations(x, bits=4, symmetric=False, group_size=group_size, backend="reference")
    got = osengine.quantize_activations(cuda(x), bits=4, symmetric=False, group_size=group_size)
    for g, r in zip(got, want):
        np.testing.assert_array_equal(host(g), r)
    delta = rng.uniform(0.01, 0.1, k // group_size).astype(np.float32)
    want = osengine.quantize_activations(x, scale=delta, group_size=group_size, backend="reference")
    got = osengine.quantize_activations(cuda(x), scale=cuda(delta), group_size=group_size)
    np.testing.assert_array_equal(host(got.codes), want.codes)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_quantize_half_inputs(rng, dtype):
    x = torch.randn(13, 300).to(getattr(torch, dtype))
    want = osengine.quantize_activations(x.float().numpy(), symmetric=False, backend="reference")
    got = osengine.quantize_activations(x.to(DEVICE), symmetric=False)
    np.testing.assert_array_equal(host(got.codes), want.codes)
    np.testing.assert_array_equal(host(got.scale), want.scale)


# ---- the online Hadamard rotation (rotate=True): one block per row, the row in shared memory ----------------------
# K: Paley bases 12 / 28 / 36 / 76 with Sylvester blocks, pure Sylvester, and 14336 (56 KB: above the 48 KB default
# per-block limit, the opt-in path); groups split the rotated row.
ROTATE_SHAPES = [(1, 1), (3, 2), (17, 12), (5, 24), (64, 28), (3, 36), (33, 576), (17, 1536), (5, 4096), (2, 4864),
                 (3, 14336)]


@pytest.mark.parametrize("m,k", sanitized(ROTATE_SHAPES, [(33, 576), (3, 14336)]))
@pytest.mark.parametrize("bits,symmetric,groups", [(8, False, 1), (8, True, 1), (4, False, 4), (3, True, 2)])
def test_quantize_rotated(rng, m, k, bits, symmetric, groups):
    group = k // groups if groups > 1 and k % groups == 0 else 0
    x = rng.standard_normal((m, k)).astype(np.float32) * 3 + 0.5
    shift = rng.standard_normal(k).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, k).astype(np.float32)
    kwargs = dict(bits=bits, symmetric=symmetric, group_size=group, rotate=True)
    want = osengine.quantize_activations(x, shift=shift, smooth_scale=scale, backend="reference", **kwargs)
    got = osengine.quantize_activations(cuda(x), shift=cuda(shift), smooth_scale=cuda(scale), **kwargs)
    for g, r in zip(got, want):
        np.testing.assert_array_equal(host(g), r)
    delta = rng.uniform(0.01, 0.1, max(1, groups if group else 1)).astype(np.float32)
    want = osengine.quantize_activations(x, scale=delta, backend="reference", **kwargs)
    got = osengine.quantize_activations(cuda(x), scale=cuda(delta), **kwargs)
    np.testing.assert_array_equal(host(got.codes), want.codes)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_quantize_rotated_half_inputs(rng, dtype):
    x = torch.randn(13, 1536).to(getattr(torch, dtype))
    want = osengine.quantize_activations(x.float().numpy(), symmetric=False, backend="reference", rotate=True)
    got = osengine.quantize_activations(x.to(DEVICE), symmetric=False, rotate=True)
    np.testing.assert_array_equal(host(got.codes), want.codes)
    np.testing.assert_array_equal(host(got.scale), want.scale)


# ---- errors ---------------------------------------------------------------------------------------------------------
def test_mixed_devices_are_named(rng):
    w = int8_weights(rng, 8, 32)
    a = rng.integers(-128, 128, size=(2, 32), dtype=np.int8)
    packed_gpu = osengine.pack_weights(w, backend="cuda")
    packed_cpu = osengine.pack_weights(w)
    with pytest.raises(TypeError, match=r"argument 'a': expected a CUDA tensor on cuda:0"):
        osengine.gemm(a, packed_gpu, a_scale=0.1, w_scale=0.1)
    with pytest.raises(TypeError, match=r"argument 'a': expected a CPU tensor"):
        osengine.gemm(cuda(a), packed_cpu, a_scale=0.1, w_scale=0.1)
    with pytest.raises(TypeError, match=r"argument 'bias': expected a CUDA tensor"):
        osengine.gemm(cuda(a), packed_gpu, a_scale=0.1, w_scale=0.1, bias=np.zeros(8, np.float32))
    with pytest.raises(TypeError, match=r"argument 'shift': expected a CUDA tensor"):
        osengine.quantize_activations(torch.randn(2, 32, device=DEVICE), shift=np.zeros(32, np.float32))
    with pytest.raises(RuntimeError, match=r"backend 'avx2' runs on CPU data"):
        osengine.quantize_activations(torch.randn(2, 32, device=DEVICE), backend="avx2")
    with pytest.raises(ValueError, match=r"K mismatch"):
        osengine.gemm(cuda(a[:, :16]), packed_gpu, a_scale=0.1, w_scale=0.1)


def test_fused_rms_norm_is_refused_on_cuda(rng):
    x = cuda(rng.standard_normal((4, 64)).astype(np.float32))
    with pytest.raises(RuntimeError, match="fused RMSNorm .* CPU backends only"):
        osengine.quantize_activations(x, rms_norm_weight=cuda(np.ones(64, np.float32)))


def test_fused_silu_gate_is_refused_on_cuda(rng):
    x = cuda(rng.standard_normal((4, 64)).astype(np.float32))
    with pytest.raises(RuntimeError, match="fused SiLU gate .* CPU backends only"):
        osengine.quantize_activations(x, silu_gate=True)
