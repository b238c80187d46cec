"""torch tensors go in and come out without copies (DLPack), bf16 included."""
import numpy as np
import pytest

import osengine

torch = pytest.importorskip("torch")


def test_outputs_are_torch_and_inputs_are_not_copied():
    x = torch.randn(4, 64)
    q = osengine.quantize_activations(x, bits=8, symmetric=False)
    assert isinstance(q.codes, torch.Tensor) and q.codes.dtype == torch.int8
    assert isinstance(q.scale, torch.Tensor) and q.scale.dtype == torch.float32
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    packed = osengine.pack_weights(w)
    out = torch.empty(4, 8)
    pointer = out.data_ptr()
    result = osengine.gemm(q.codes, packed, a_scale=q.scale, w_scale=torch.full((8,), 0.01),
                           a_zero_point=q.zero_point, out=out)
    assert result.data_ptr() == pointer
    want = osengine.gemm(q.codes.numpy(), packed, a_scale=q.scale.numpy(), w_scale=np.full(8, 0.01, np.float32),
                         a_zero_point=q.zero_point.numpy())
    np.testing.assert_array_equal(result.numpy(), want)


def test_engine_reads_the_callers_memory():
    # Writing into a view of the caller's tensor proves no copy was taken on the way in.
    x = torch.zeros(2, 16)
    codes = torch.empty(2, 16, dtype=torch.int8)
    osengine._C.quantize_static(x, None, None, torch.tensor([0.5]), None, codes, 8, True, 0, "auto")
    assert codes.abs().sum() == 0
    x[1, 3] = 10.0
    osengine._C.quantize_static(x, None, None, torch.tensor([0.5]), None, codes, 8, True, 0, "auto")
    assert codes[1, 3] == 20


def test_bfloat16_in_and_out():
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    q32 = osengine.quantize_activations(x.float())
    q16 = osengine.quantize_activations(x)
    assert torch.equal(q16.codes, q32.codes)
    packed = osengine.pack_weights(torch.randint(-127, 128, (5, 32), dtype=torch.int8))
    y32 = osengine.gemm(q16.codes, packed, a_scale=q16.scale, w_scale=0.01)
    y16 = osengine.gemm(q16.codes, packed, a_scale=q16.scale, w_scale=0.01, out_dtype="bfloat16")
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16, y32.to(torch.bfloat16))


def test_requires_grad_inputs_are_accepted():
    x = torch.randn(2, 16, requires_grad=True)
    q = osengine.quantize_activations(x)
    assert q.codes.shape == (2, 16)


def test_every_kind_of_torch_tensor_is_read_as_torch_sees_it():
    # Plain tensors take torch's C exporter, others (Parameter) Tensor.__dlpack__: same values.
    x = torch.randn(3, 32)
    want = osengine.quantize_activations(x.numpy(), bits=8, symmetric=False)
    for tensor in (x, torch.nn.Parameter(x.clone(), requires_grad=False), torch.nn.Parameter(x.clone())):
        q = osengine.quantize_activations(tensor, bits=8, symmetric=False)
        np.testing.assert_array_equal(q.codes.numpy(), want.codes)
        np.testing.assert_array_equal(q.scale.numpy(), want.scale)
    strided = torch.randn(32, 3).t()  # not contiguous: refused, never read as if it were
    with pytest.raises(TypeError, match=r"argument 'x': must be contiguous"):
        osengine._C.quantize_dynamic(strided, None, None, torch.empty(3, 32, dtype=torch.int8), torch.empty(3),
                                     torch.empty(3, dtype=torch.int32), 8, True, 0, "auto")


def test_a_lazily_negated_view_is_refused():
    # DLPack exports such a view's memory without the negation: reading it would silently flip every sign.
    negated = torch._neg_view(-torch.randn(3, 32))
    assert negated.is_neg()
    with pytest.raises(ValueError, match=r"argument 'x': is a lazily negated torch view.*resolve_neg\(\)"):
        osengine.quantize_activations(negated)
    q = osengine.quantize_activations(negated.resolve_neg())
    assert q.codes.shape == (3, 32)


def test_an_output_that_requires_grad_is_refused_by_the_extension():
    codes = torch.empty(2, 16, dtype=torch.int8)
    scale = torch.empty(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"argument 'out_delta': could not be exported through DLPack: BufferError: "
                                         r"Can't export tensors that require gradient[^\n]*detach\(\)\)$"):
        osengine._C.quantize_dynamic(torch.randn(2, 16), None, None, codes, scale, torch.empty(2, dtype=torch.int32),
                                     8, True, 0, "auto")


def test_unsupported_torch_dtype_is_named():
    with pytest.raises(TypeError, match=r"argument 'x': unsupported dtype"):
        osengine.quantize_activations(torch.randn(2, 8, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(2,), (1, 2), (3, 18), (17, 4096), (2, 3, 64)])
def test_int4_packing_with_torch_ops_matches_the_engine(shape):
    # CUDA tensors are packed this way (on their GPU); here on the CPU against the engine's own packing
    from osengine.engine.ops import _pack_int4_torch

    codes = torch.randint(-8, 8, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(5))
    ours = _pack_int4_torch(codes)
    assert ours.dtype == torch.uint8 and ours.shape == shape[:-1] + (shape[-1] // 2,)
    assert torch.equal(ours, osengine.pack_int4(codes))
    assert torch.equal(osengine.unpack_int4(ours), codes)
    strided = torch.randint(-8, 8, (4, 16), dtype=torch.int8)[:, ::2]  # a view whose rows are not contiguous
    assert torch.equal(_pack_int4_torch(strided), osengine.pack_int4(strided.contiguous()))


def test_int4_packing_with_torch_ops_names_bad_codes():
    from osengine.engine.ops import _pack_int4_torch

    with pytest.raises(TypeError, match=r"osengine.pack_int4: argument 'codes': expected dtype int8, got int32"):
        _pack_int4_torch(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"argument 'codes': last dimension must be even .* got \[2, 3\]"):
        _pack_int4_torch(torch.zeros(2, 3, dtype=torch.int8))
