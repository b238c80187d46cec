"""Several Python threads at once: the engine's ops (they release the GIL; scratch memory is per thread, weights are
read only) and one engine-backed model generating for two prompts in parallel give exactly what they give one after
the other. (Native runtime contexts: tests/runtime/test_native.py.)"""
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import osengine
from osengine import api

from tiny_models import tiny_llama_folder


def _in_threads(jobs):
    """Run every job in its own thread, all started together; their results in order (exceptions re-raised)."""
    results, errors = [None] * len(jobs), []
    start = threading.Barrier(len(jobs))

    def run(i):
        try:
            start.wait()
            results[i] = jobs[i]()
        except BaseException as e:   # noqa: BLE001 - handed to the main thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("bits", [8, 4])
def test_engine_ops_from_several_threads(bits):
    rng = np.random.default_rng(0)
    k, n = 256, 96
    codes = rng.integers(-7 if bits == 4 else -127, 8 if bits == 4 else 128, size=(n, k)).astype(np.int8)
    packed = osengine.pack_weights(osengine.pack_int4(codes) if bits == 4 else codes, bits=bits)
    w_scale = rng.random(n, dtype=np.float32) + 0.5
    inputs = [rng.standard_normal((m, k), dtype=np.float32) for m in (1, 3, 17, 64, 5, 33)]

    def job(x):
        def run():
            outs = []
            for _ in range(20):
                q = osengine.quantize_activations(x, bits=8, symmetric=False)
                outs.append(osengine.gemm(q.codes, packed, a_scale=q.scale, a_zero_point=q.zero_point,
                                          w_scale=w_scale))
            return outs
        return run
    sequential = [job(x)() for x in inputs]
    parallel = _in_threads([job(x) for x in inputs])
    for one, together in zip(sequential, parallel):
        assert all(np.array_equal(one[0], out) for out in together)


def test_one_engine_model_generating_in_two_threads(tmp_path):
    base = tiny_llama_folder(tmp_path)
    calib = torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    api.quantize(str(base), recipe="w8a8-static", strategy="minmax", calibration=calib, out=tmp_path / "q",
                 progress=False)
    model, _ = api.load(tmp_path / "q")
    prompts = [torch.tensor([[1, 5, 9, 13, 4]]), torch.tensor([[1, 40, 41, 7, 7, 22, 3]])]
    gen = dict(max_new_tokens=24, do_sample=False, pad_token_id=2)

    def job(p):
        def run():
            with torch.no_grad():
                return model.generate(p, **gen)
        return run
    sequential = [job(p)() for p in prompts]
    for _ in range(3):
        parallel = _in_threads([job(p) for p in prompts])
        assert all(torch.equal(a, b) for a, b in zip(sequential, parallel))
    assert not torch.equal(sequential[0][0, -24:], sequential[1][0, -24:])
