"""benchmarks/gpu_check.py without a GPU: the dry mode CI runs, the architecture it builds for, its time budget
(steps skipped when short of time, stopped at the budget), CUTLASS from a carried wheel, and the summaries of a
recorded sample folder (tests/benchmarks/data/gpu_check_sample: the tools' formats, invented numbers)."""
import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SAMPLE = Path(__file__).parent / "data" / "gpu_check_sample"


@pytest.fixture(scope="module")
def kit():
    spec = importlib.util.spec_from_file_location("osengine_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sample(tmp_path):
    folder = tmp_path / "sample"
    shutil.copytree(SAMPLE, folder)
    return folder


def run_script(*argv):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    out = tmp_path / "report"
    done = run_script("--dry-run", "--out", str(out), "--arch", "90a")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "--dry-run: nothing is run" in text
    for name in ("env", "build", "import", "tests", "memcheck", "racecheck", "gemm-llama7b", "e2e-llama7b",
                 "gemm-llama70b", "e2e-smollm2"):
        assert f"\n  {name} (~" in text
    assert "OSENGINE_CUDA_ARCHS=90a" in text and "--no-build-isolation" in text
    assert "compute-sanitizer --tool memcheck" in text and "-m sanitize" in text
    # the sanitizers see each tensor as its own allocation (torch's caching allocator off), the tests do not
    lines = {line.split()[0]: next_line for line, next_line in zip(text.splitlines(), text.splitlines()[1:])
             if line.startswith("  ") and not line.startswith("    ")}
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1 " in lines["memcheck"]
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING" not in lines["tests"]
    assert "PYTHONPATH=" in lines["tests"] and "build/gpu-check/site" in lines["tests"]
    assert "benchmarks/gemm.py --device cuda" in text and "--shapes llama70b" in text
    assert "bench --device cuda" in text and "--random llama7b" in text and "--impl fp16,w8a8,w4a8" in text
    assert not out.exists()


def test_without_a_gpu_it_says_so_and_exits_0(kit, tmp_path):
    if kit.gpu_info() is not None:
        pytest.skip("this machine has a GPU")
    done = run_script("--out", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr
    assert "no GPU found" in done.stdout and "gemm-llama7b" in done.stdout
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("argv,message", [(["--steps", "tests,warp"], "unknown warp"),
                                          (["--budget-s", "10"], "--budget-s must be more"),
                                          (["--summarize", "/nonexistent"], "no steps.json")])
def test_bad_arguments(kit, argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        kit.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_local_arch(kit):
    assert kit.local_arch("9.0") == "90a"
    assert [kit.local_arch(cc) for cc in ("8.0", "8.6", "8.9")] == ["80", "86", "89"]
    assert kit.local_arch("10.0") == "80;100"
    with pytest.raises(ValueError, match="needs sm_80"):
        kit.local_arch("7.5")
    with pytest.raises(ValueError, match="expected MAJOR.MINOR"):
        kit.local_arch("Hopper")


def test_steps_follow_the_budget(kit, tmp_path):
    args = kit.parse_args(["--out", str(tmp_path), "--budget-s", str(kit.RESERVE_S + 3)])
    runner = kit.Runner(args, kit.time.monotonic())
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    # a step whose typical time is not left does not start
    skipped = runner.run(kit.Step("slow", "a slow step", 100, sleeper))
    assert skipped.status == "skipped" and "short of time" in skipped.reason
    # a step that overruns is stopped at the budget, its log kept
    stopped = runner.run(kit.Step("overrun", "a step that overruns", 0, sleeper))
    assert stopped.status == "timed_out" and stopped.seconds < 10
    assert (tmp_path / "overrun.log").read_text().startswith("$ ")
    recorded = json.loads((tmp_path / "steps.json").read_text())
    assert [(r["name"], r["status"]) for r in recorded] == [("slow", "skipped"), ("overrun", "timed_out")]


def test_an_overrunning_step_is_killed_with_its_children(kit, tmp_path):
    # a benchmark's per-model processes must not outlive its step (they would hold the GPU)
    args = kit.parse_args(["--out", str(tmp_path), "--budget-s", "300"])
    runner = kit.Runner(args, kit.time.monotonic())
    pid_file = tmp_path / "child.pid"
    parent = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    result = runner.run(kit.Step("parent", "starts a child", 0, [sys.executable, "-c", parent], cap_s=3))
    assert result.status == "timed_out"
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is immediate; the zombie's parent (init) may take a moment to reap it
        try:
            kit.os.kill(child, 0)
        except ProcessLookupError:
            break
        if "zombie" in Path(f"/proc/{child}/status").read_text().lower():
            break
        kit.time.sleep(0.1)
    else:
        raise AssertionError(f"the step's child {child} is still running")


def test_a_step_is_held_to_its_cap(kit, tmp_path):
    args = kit.parse_args(["--out", str(tmp_path), "--budget-s", "300"])
    runner = kit.Runner(args, kit.time.monotonic())
    capped = runner.run(kit.Step("capped", "capped at 1 s", 0, [sys.executable, "-c", "import time; time.sleep(60)"],
                                 cap_s=1))
    assert capped.status == "timed_out" and capped.seconds < 10 and "1 s" in capped.reason


def test_step_results_and_time_limit_flag(kit, tmp_path):
    args = kit.parse_args(["--out", str(tmp_path), "--budget-s", "100"])
    runner = kit.Runner(args, kit.time.monotonic())
    echo = [sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(3 if '--fail' in sys.argv else 0)"]
    ok = runner.run(kit.Step("echo", "echo", 0, echo, stdout_to="echo.json", time_limit_flag="--time-limit"))
    assert ok.status == "passed" and ok.returncode == 0
    printed = (tmp_path / "echo.json").read_text()
    assert "--time-limit" in printed  # the command is told how much time it has
    failed = runner.run(kit.Step("fail", "fails", 0, echo + ["--fail"]))
    assert failed.status == "failed" and failed.reason == "exit status 3"
    missing = runner.run(kit.Step("missing", "no such program", 0, ["/nonexistent/program"]))
    assert missing.status == "failed" and "could not start" in missing.reason


def test_cutlass_headers_from_a_carried_wheel(kit, tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "nvidia_cutlass-4.2.0.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("cutlass_library/source/include/cutlass/cutlass.h", "// cutlass\n")
        wheel.writestr("cutlass_library/source/tools/util/include/cutlass/util/host_tensor.h", "// util\n")
        wheel.writestr("cutlass_library/source/examples/00_basic_gemm/basic_gemm.cu", "// not needed\n")
        wheel.writestr("cutlass_library/__init__.py", "")
    monkeypatch.delenv("CUTLASS_PATH", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cutlass_library" else real_find_spec(name, *a))
    args = kit.parse_args(["--wheels", str(wheels)])
    root, origin = kit.find_cutlass(args, tmp_path / "work")
    assert "unpacked from nvidia_cutlass-4.2.0.0" in origin
    assert (Path(root) / "include" / "cutlass" / "cutlass.h").is_file()
    assert (Path(root) / "tools" / "util" / "include" / "cutlass" / "util" / "host_tensor.h").is_file()
    assert not (Path(root) / "examples").exists()
    root, origin = kit.find_cutlass(kit.parse_args(["--wheels", str(tmp_path / "none")]), tmp_path / "work")
    assert root is None and "no --cutlass" in origin


def test_sanitizer_logs(kit, tmp_path):
    log = tmp_path / "memcheck.log"
    log.write_text((SAMPLE / "memcheck.log").read_text())
    report = kit.parse_sanitizer(log)
    assert report["errors"] == 1 and report["first_reports"][0].startswith("Invalid __global__ write")
    log.write_text("========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n")
    assert (kit.parse_sanitizer(log)["errors"], kit.parse_sanitizer(log)["warnings"]) == (1, 2)
    log.write_text("Traceback (most recent call last):\n")
    assert kit.parse_sanitizer(log)["errors"] is None
    assert kit.parse_sanitizer(tmp_path / "absent.log") is None


def test_summary_of_the_recorded_sample(kit, sample):
    pytest.importorskip("torch")  # the GEMM targets come from benchmarks/gemm.py itself
    summary = kit.summarize(sample)
    on_disk = json.loads((sample / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["version"] == kit.SUMMARY_VERSION and summary["verdict"] == "FAIL"
    assert summary["machine"]["gpu"] == "NVIDIA H100 80GB HBM3" and summary["machine"]["arch"] == "90a"
    assert [s["name"] for s in summary["steps"]][-1] == "e2e-smollm2"
    checks = {c["check"]: c for c in summary["checks"]}
    assert set(checks["every CUDA test passes"]) == {"check", "measured", "verdict"}
    assert checks["every CUDA test passes"]["verdict"] == "FAIL"
    assert checks["every CUDA test passes"]["measured"].startswith("3 passed, 1 failed")
    failure = summary["tests"]["failed"][0]
    assert failure["test"].endswith("test_w4a8[65-128-512]") and failure["kind"] == "failure"
    assert failure["message"] == "AssertionError: Arrays are not equal Mismatched elements: 3 / 8320 (0.0361%)"
    assert checks["compute-sanitizer memcheck reports nothing"]["verdict"] == "FAIL"
    assert checks["compute-sanitizer racecheck reports nothing"] == {
        "check": "compute-sanitizer racecheck reports nothing", "measured": "0 error(s), 0 warning(s) over 2 tests",
        "verdict": "PASS"}
    # the GEMM targets, computed by benchmarks/gemm.py from the records of both families
    assert checks["GEMM points measured (LLaMA-7B, LLaMA-70B)"] == {
        "check": "GEMM points measured (LLaMA-7B, LLaMA-70B)", "measured": "9 of 18, 3 of 16", "verdict": "SKIP"}
    w8a8 = checks["W8A8 >= 1.8x torch fp16 at M >= 2048"]
    assert w8a8["verdict"] == "FAIL" and "worst 1.65x at N=4096 K=4096 M=2048 (0/4 points meet it)" in \
        w8a8["measured"]
    assert checks["W4A8 >= 2.5x torch fp16 at M <= 16"]["verdict"] == "FAIL"
    assert checks["epilogue (w8a8_gemm / w8a8_no_epilogue - 1) <= 3%"]["verdict"] == "FAIL"
    assert checks["W8A8 GEMM (w8a8_gemm) >= 1.0x torch._int_mm at every M"] == {
        "check": "W8A8 GEMM (w8a8_gemm) >= 1.0x torch._int_mm at every M",
        "measured": "worst 1.02x at N=8192 K=8192 M=2048 (7/7 points meet it)", "verdict": "PASS"}
    # the end-to-end target on the LLaMA-7B-shaped model, from osengine bench's own target check
    prefill = checks["LLaMA-7B-shaped model: prefill 4x1024 w8a8 >= 1.3x fp16"]
    assert prefill["measured"] == "1.39x" and prefill["verdict"] == "PASS"
    assert len(summary["gemm"]["records"]) == 79 and "e2e-smollm2" not in summary["e2e"]
    text = (sample / "summary.md").read_text()
    assert text.startswith("# CUDA backend on a GPU: FAIL\n")
    for heading in ("## Checks and targets", "## Steps", "## Failing tests", "## memcheck: first reports",
                    "## GEMMs (benchmarks/gemm.py --device cuda)", "## End to end: random-llama7b"):
        assert heading in text
    assert "| e2e-smollm2 | skipped | 0 | short of time" in text
    assert "| prefill | 4 x 1024 |" in text  # the bench's own table


def test_summary_verdicts(kit, sample):
    pytest.importorskip("torch")
    for name in ("gemm-llama7b.json", "gemm-llama70b.json", "e2e-llama7b.json", "memcheck.log", "memcheck.xml"):
        (sample / name).unlink()
    steps = json.loads((sample / "steps.json").read_text())
    for s in steps:
        if s["name"] == "tests":
            s.update(status="passed", reason="", returncode=0)
    (sample / "steps.json").write_text(json.dumps([s for s in steps if s["name"] not in ("memcheck",)]))
    (sample / "tests.xml").write_text((sample / "racecheck.xml").read_text())
    summary = kit.summarize(sample)
    # nothing failed, but benchmarks are missing and a step was skipped: not a PASS
    assert summary["verdict"] == "INCOMPLETE"
    checks = {c["check"]: c["verdict"] for c in summary["checks"]}
    assert checks["every CUDA test passes"] == "PASS" and checks["compute-sanitizer memcheck reports nothing"] == "SKIP"
    # every test skipped (a machine without the GPU) is a failure, not a pass
    xml = (sample / "tests.xml").read_text().replace('skipped="0"', 'skipped="2"')
    (sample / "tests.xml").write_text(xml)
    summary = kit.summarize(sample)
    check = next(c for c in summary["checks"] if c["check"] == "every CUDA test passes")
    assert check["verdict"] == "FAIL" and "all skipped" in check["measured"]
    done = run_script("--summarize", str(sample))
    assert done.returncode == 0 and done.stdout.startswith("FAIL: ")
