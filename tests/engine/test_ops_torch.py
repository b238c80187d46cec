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


def test_unsupported_torch_dtype_is_named():
    with pytest.raises(TypeError, match=r"argument 'x': unsupported dtype"):
        osengine.quantize_activations(torch.randn(2, 8, dtype=torch.float64))
