"""benchmarks/gemm.py without running a benchmark: argument defaults per device, and --device cuda's one-line error
where there is no GPU or no CUDA backend in this build."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

import osengine.ops  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gemm.py"


@pytest.fixture(scope="module")
def gemm():
    spec = importlib.util.spec_from_file_location("osengine_bench_gemm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_defaults_unchanged(gemm):
    args = gemm.parse_args([])
    assert args.device == "cpu"
    assert args.m == [1, 16, 128, 512, 2048]
    assert args.impl == ["torch_fp32", "fbgemm_int8", "w8a8", "w8a8_gemm", "w8a8_no_epilogue", "w4a8", "w4a4"]
    assert args.shapes == gemm.SHAPES["smollm2"] + gemm.SHAPES["llama7b"]
    assert (args.threads, args.backend, args.min_time, args.repeats) == (2, "auto", 0.2, 5)


def test_cuda_defaults(gemm):
    args = gemm.parse_args(["--device", "cuda"])
    assert args.m == [1, 16, 128, 512, 2048, 8192]
    assert args.impl == ["torch_fp16", "torch_int_mm", "w8a8", "w8a8_gemm", "w8a8_no_epilogue", "w4a8", "w4a4"]
    assert args.shapes == gemm.SHAPES["llama7b"] + gemm.SHAPES["llama70b"]
    assert [(n, k) for _, n, k in gemm.SHAPES["llama70b"]] == [(8192, 8192), (1024, 8192), (28672, 8192),
                                                                  (8192, 28672)]
    assert args.cuda_graph and args.max_call_s == 2.0
    args = gemm.parse_args(["--device", "cuda", "--shapes", "llama70b", "--m", "1,16", "--impl", "w4a8,torch_fp16",
                            "--no-cuda-graph"])
    assert args.m == [1, 16] and args.impl == ["torch_fp16", "w4a8"] and not args.cuda_graph


@pytest.mark.parametrize("argv", [["--device", "cuda", "--impl", "torch_fp32"], ["--impl", "torch_fp16"],
                                  ["--device", "cuda", "--backend", "avx2"], ["--device", "tpu"]])
def test_bad_arguments(gemm, argv):
    with pytest.raises(SystemExit) as info:
        gemm.parse_args(argv)
    assert info.value.code == 2


def test_cuda_tables_and_targets(gemm):
    records = []
    for impl, ms in [("torch_fp16", 2.0), ("torch_int_mm", 1.1), ("w8a8", 1.0), ("w8a8_gemm", 1.0),
                     ("w8a8_no_epilogue", 0.98), ("w4a8", 1.0), ("w4a4", 5.0)]:
        records.append({"impl": impl, "m": 2048, "n": 8192, "k": 8192, "ms": ms, "iqr_ms": 0.01, "gops": 1.0,
                        "shape": "llama70b q/o", "timing": "eager" if impl == "w4a4" else "graph"})
    text = gemm.table(records, gemm.CUDA_IMPLS, "cuda")
    assert "speedup vs torch_fp16" in text and "1.10x" in text and "w4a4 llama70b q/o M=2048" in text
    lines = gemm.targets(records, "cuda")
    assert lines[1].startswith("  PASS  W8A8 >= 1.8x torch fp16 at M >= 2048")
    assert lines[2].startswith("  PASS  W8A8 GEMM")
    assert lines[3].startswith("  PASS  epilogue")
    assert lines[4].startswith("  SKIP  W4A8")


def test_cuda_without_gpu_is_a_one_line_error(gemm, capsys):
    import torch

    if torch.cuda.is_available() and osengine.ops.has_cuda_backend():
        pytest.skip("a GPU and the CUDA backend are here: --device cuda would run the benchmark")
    with pytest.raises(SystemExit) as info:
        gemm.main(["--device", "cuda", "--shapes", "llama7b", "--m", "1"])
    message = str(info.value.code)
    assert message.startswith("gemm.py: error: --device cuda: ") and "\n" not in message
    assert "GPU" in message or "CUDA backend" in message
    assert capsys.readouterr().out == ""
    # the same as a script of its own (this test module's imports must not be what makes it work)
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--shapes", "llama7b", "--m", "1",
                           "--time-limit", "30"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [message]
