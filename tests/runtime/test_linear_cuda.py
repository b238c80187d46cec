"""The engine-backed model on a GPU: EngineLinear built from CUDA tensors computes what the same layer computes on
the CPU, bit for bit (both run the engine's exact integer ops), and a converted model runs on CUDA. Skipped without a
GPU or without the CUDA backend in this build (benchmarks/gpu_check.py runs it where there is one)."""
import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import osengine
from osengine.ops import has_cuda_backend
from osengine.quant.layers import symmetric_weight_codes
from osengine.runtime.convert import convert_to_engine
from osengine.runtime.linear import EngineLinear

from tiny_models import tiny_llama

pytestmark = pytest.mark.skipif(
    not (has_cuda_backend() and torch.cuda.is_available()),
    reason="needs a GPU and osengine built with the CUDA backend",
)


@pytest.mark.parametrize("weight_bits,act_bits,group,act_dynamic",
                         [(8, 8, 0, True), (8, 8, 0, False), (4, 8, 0, True), (4, 8, 32, True), (4, 4, 0, True),
                          (4, 4, 32, True)])
def test_engine_linear_on_cuda_equals_the_cpu(weight_bits, act_bits, group, act_dynamic):
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(48, 128, generator=g)
    codes, w_scale, _ = symmetric_weight_codes(weight, weight_bits, "per-group" if group else "per-channel", group)
    bias = torch.randn(48, generator=g)
    shift = torch.randn(128, generator=g) * 0.1
    x = torch.randn(5, 7, 128, generator=g)
    options = dict(weight_bits=weight_bits, weight_group_size=group, act_bits=act_bits,
                   act_group_size=group if act_bits == 4 else 0, act_dynamic=act_dynamic,
                   act_scale=None if act_dynamic else torch.tensor([0.05]),
                   act_zero_point=None if act_dynamic else torch.tensor([3], dtype=torch.int32))
    cpu = EngineLinear(codes, w_scale, bias, input_shift=shift, backend="reference", **options)
    gpu_options = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    gpu = EngineLinear(codes.cuda(), w_scale.cuda(), bias.cuda(), input_shift=shift.cuda(), **gpu_options)
    assert gpu.packed.backend == "cuda"
    with torch.no_grad():
        want, got = cpu(x), gpu(x.cuda())
    assert got.is_cuda and got.dtype == torch.float32
    assert torch.equal(got.cpu(), want)


def test_int4_packing_on_the_gpu_equals_the_engines():
    codes = torch.randint(-8, 8, (33, 4096), dtype=torch.int8)
    packed = osengine.pack_int4(codes.cuda())
    assert packed.is_cuda and torch.equal(packed.cpu(), osengine.pack_int4(codes))


@pytest.mark.parametrize("recipe", ["w8a8-static", "w4a8-group"])
def test_converted_model_runs_on_cuda_like_on_the_cpu(recipe):
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    osengine.quantize(model, recipe=recipe, strategy="osplus", calibration=calibration, progress=False)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    on_gpu = convert_to_engine(copy.deepcopy(model).cuda(), fuse=True, quantize_embeddings=True).eval()
    assert all(m.packed.backend == "cuda" for m in on_gpu.modules() if isinstance(m, EngineLinear) and m.packed)
    with torch.no_grad():
        got = on_gpu(input_ids=ids.cuda()).logits.cpu()
    on_cpu = convert_to_engine(model, fuse=True, quantize_embeddings=True).eval()
    with torch.no_grad():
        want = on_cpu(input_ids=ids).logits
    # the int ops are exact on both; the float parts (norms, attention) round differently on the GPU
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_float16_activations_stay_float16_on_the_gpu():
    # an fp16 model's linears: quantize reads fp16 and the GEMM writes fp16 (no float32 passes around them); the
    # kernels compute in float32 and round the output once, as the CPU's float32 result rounded to float16
    g = torch.Generator().manual_seed(8)
    codes, w_scale, _ = symmetric_weight_codes(torch.randn(32, 64, generator=g), 8, "per-channel", 0)
    x = torch.randn(6, 64, generator=g).half()
    cpu = EngineLinear(codes, w_scale, None, backend="reference")
    gpu = EngineLinear(codes.cuda(), w_scale.cuda(), None)
    with torch.no_grad():
        got = gpu(x.cuda())
        want = cpu(x.float())
    assert got.dtype == torch.float16 and torch.equal(got.cpu(), want.half())
