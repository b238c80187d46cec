"""GEMM speed of osengine (W8A8, W4A8, W4A4) against torch fp32 and FBGEMM dynamic int8 (--device cpu, the
default) or torch fp16 and torch._int_mm (--device cuda), on real models' linears.

Shapes (N, K) from SmolLM2-135M (q/o 576x576, up/gate 1536x576, down 576x1536) and LLaMA-7B (q/k/v/o 4096x4096,
up/gate 11008x4096, down 4096x11008) at M in {1, 16, 128, 512, 2048} tokens. What each impl times, per call:

  torch_fp32        F.linear(x, W): x fp32 [M, K], W fp32 [N, K], no bias (a LLaMA linear).
  fbgemm_int8       torch.ao dynamic quantization (engine fbgemm, default qconfig: per-tensor int8 weights) of an
                    nn.Linear without bias, called on fp32 x: includes its own activation quantization.
  w8a8              the full osengine linear: quantize_activations(x, bits=8, symmetric=False) dynamic per token,
                    then gemm() with per-token a_scale / a_zero_point, per-channel w_scale, bias, fp32 out.
  w8a8_gemm         gemm() alone, same epilogue, on pre-quantized codes (output buffer preallocated).
  w8a8_no_epilogue  gemm_accumulate() (raw int32, no epilogue) on the same codes (output preallocated).
                    The epilogue's cost is w8a8_gemm / w8a8_no_epilogue - 1.
  w4a8              as w8a8 with int4 per-channel weights (pack_weights(pack_int4(codes), bits=4)).
  w4a4              quantize_activations(x, bits=4, symmetric=False), pack_int4 of the codes, gemm_w4a4.

Method. Weights are random normal, quantized symmetric per channel (int8 codes in [-127, 127], int4 in [-7, 7]);
x is random normal with a few outlier channels (x20). Every impl rotates over distinct copies of its inputs and
weights (the same rule for all: as many copies as fit in ~64 MB, at least 1), so that a small weight
matrix is not measured resident in the 32 MB L3 while a big one streams from memory. After warm-up calls (one pass
over the copies), the impls of a point are sampled round-robin (a change in machine load hits them all alike) until
each has --repeats samples and --min-time seconds; a sample is one call (or, for calls under ~1 ms, the mean of a
batch of calls) timed with time.perf_counter. We report the median,
and the spread as the interquartile range (the table shows half of it, relative to the median). GOP/s counts
2*M*N*K operations. Ratios are torch_fp32 time / impl time, measured in the same run.

    python benchmarks/gemm.py                                   # everything, a table and the targets (~minutes)
    python benchmarks/gemm.py --shapes smollm2 --m 1,16         # a quick subset
    python benchmarks/gemm.py --shapes llama7b --impl w8a8,torch_fp32 --json > run.json

--device cuda (NOT RUN YET: written without a GPU; expect to fix small things on the first run). Needs a GPU visible
to torch and osengine built with the CUDA backend, else it exits with a one-line error. Shapes LLaMA-7B and LLaMA-70B
(q/o 8192x8192, k/v 1024x8192, up/gate 28672x8192, down 8192x28672) at M in {1, 16, 128, 512, 2048, 8192}. x is
fp16 on the GPU for every impl; weights are packed with pack_weights(..., backend="cuda"); the osengine outputs are
fp16 (the CUDA gemm writes fp32, bf16 or fp16; fp16 is what torch_fp16 returns, so both write the same bytes):

  torch_fp16        F.linear(x, W) in fp16 (cuBLAS), no bias.
  torch_int_mm      torch._int_mm(A, W.t()): int8 codes A [M, K] and W [N, K] (W.t() is the column-major [K, N] view),
                    raw int32 out (cuBLASLt). Shapes it refuses (M <= 16 on some torch versions, K or N not a multiple
                    of 8) record nothing, with a note on stderr.
  w8a8              quantize_activations(x) on the GPU (dynamic per token, asymmetric) + gemm(), fp16 out.
  w8a8_gemm         gemm() alone on pre-quantized codes, preallocated fp16 out.
  w8a8_no_epilogue  gemm_accumulate() on the same codes, preallocated int32 out.
  w4a8              as w8a8 with int4 per-channel weights.
  w4a4              quantize_activations(x, bits=4) + pack_int4 of the codes (on the GPU: torch's elementwise ops)
                    + gemm_w4a4, fp16 out.

Method (CUDA). Every impl rotates over distinct copies of its inputs and weights, enough to cover 3x the GPU's L2
(50 MB on H100: 150 MB) so that weights stream from HBM, as in a real forward pass; fewer where the GPU memory left
(half of the free memory, shared by the impls of a point) does not allow it; a copy bigger than that budget runs
alone. Warm-up: one pass over the copies (at least 3 calls) on a side stream. A sample is a batch of calls (a multiple
of the copies, >= ~2 ms of GPU time) timed with CUDA events. By default (--cuda-graph) the batch is captured once into
a CUDA graph and replayed, so that host-side Python and launch overhead do not hide the kernels at small M; an impl
whose capture fails is timed eagerly instead (stderr says why; its records have "timing": "eager", listed under
the table). --no-cuda-graph times eager calls (host overhead included). Impls are sampled round-robin as on the CPU;
median and IQR likewise. --max-call-s (default 2 s) skips an impl at a larger M when its time at a smaller M of the
same shape, scaled by M, predicts a call longer than that (W4A4 on Hopper runs on the CUDA-core fallback).
--time-limit S starts no new point after S seconds (benchmarks/gpu_check.py gives it what is left of its budget).
Ratios are torch_fp16 time / impl time. Targets (LLaMA-7B and -70B shapes): W8A8 >= 1.8x fp16 at M >= 2048;
w8a8_gemm (int8 codes in, fp16 out, epilogue included) at least as fast as torch._int_mm (int8 in, raw int32 out) at
every M where _int_mm runs; epilogue cost w8a8_gemm / w8a8_no_epilogue - 1 <= 3%; W4A8 >= 2.5x fp16 at M <= 16.

    python benchmarks/gemm.py --device cuda --shapes llama7b --json > cuda7b.json

--rotate: the cost of the online Hadamard rotation (quantize(..., rotate=True), QuaRot's x H / sqrt(K) fused into the
activation quantization) where it runs, on down_proj's input: x = [gate | up] [M, 2K] fp32, quantized dynamic per
token asymmetric int8 with the fused SiLU gate, with and without the rotation, against that down_proj's GEMM (int8
codes in, the w8a8_gemm epilogue, fp32 out). Shapes (N, K): SmolLM2-135M down 576x1536 (1536 = 12 * 128), a 4096-wide
one (K = 4096, Sylvester only) and LLaMA-3-8B down 4096x14336 (28 * 512); LLaMA-2's 11008 has no Hadamard matrix of
this construction. M in {1, 16, 64, 512}. Timing as above (copies, round-robin samples, medians):

  quantize          quantize_activations(x, bits=8, symmetric=False, silu_gate=True)
  quantize_rotate   the same with rotate=True
  w8a8_gemm         gemm() on the codes, preallocated output
The rotation's cost is (quantize_rotate - quantize) / w8a8_gemm; target <= 5% at M >= 16.

    python benchmarks/gemm.py --rotate                          # the table and the target
    python benchmarks/gemm.py --rotate --m 16,64 --json > rotate.json
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import osengine
from osengine.ops import has_cuda_backend

SHAPES = {  # name: (N, K)
    "smollm2": [("smollm2 q/o", 576, 576), ("smollm2 up/gate", 1536, 576), ("smollm2 down", 576, 1536)],
    "llama7b": [("llama7b q/k/v/o", 4096, 4096), ("llama7b up/gate", 11008, 4096), ("llama7b down", 4096, 11008)],
    "llama70b": [("llama70b q/o", 8192, 8192), ("llama70b k/v", 1024, 8192), ("llama70b up/gate", 28672, 8192),
                 ("llama70b down", 8192, 28672)],
}
DEFAULT_SHAPES = {"cpu": ["smollm2", "llama7b"], "cuda": ["llama7b", "llama70b"]}  # what --shapes all means
ROTATE_SHAPES = [("smollm2 down", 576, 1536), ("4096-wide", 4096, 4096), ("llama3-8b down", 4096, 14336)]
ROTATE_IMPLS = ["quantize", "quantize_rotate", "w8a8_gemm"]
ROTATE_DEFAULT_M = [1, 16, 64, 512]
IMPLS = ["torch_fp32", "fbgemm_int8", "w8a8", "w8a8_gemm", "w8a8_no_epilogue", "w4a8", "w4a4"]
SHORT = {"torch_fp32": "fp32", "fbgemm_int8": "fbgemm", "w8a8_no_epilogue": "w8a8_noepi"}
DEFAULT_M = [1, 16, 128, 512, 2048]
CUDA_IMPLS = ["torch_fp16", "torch_int_mm", "w8a8", "w8a8_gemm", "w8a8_no_epilogue", "w4a8", "w4a4"]
CUDA_DEFAULT_M = [1, 16, 128, 512, 2048, 8192]
SHORT.update({"torch_fp16": "fp16", "torch_int_mm": "int_mm"})
ROTATE_BYTES = 64 << 20  # per impl: over twice the 32 MB L3
MAX_COPIES = 512
BATCH_SECONDS = 1e-3  # calls faster than this are timed in batches


def device_name(threads: int) -> str:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model or platform.processor() or platform.machine()} ({threads} threads)"


def quantize_weights(w: torch.Tensor, bits: int):
    """Symmetric per-channel MinMax: int8 codes [N, K] in [-(2^(b-1)-1), 2^(b-1)-1] and scales [N]."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=1) / qmax).clamp_min(1e-8)
    codes = torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return codes, scale.float()


def make_x(m: int, k: int, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    x = torch.randn(m, k, generator=gen, device=device)
    x[:, torch.randperm(k, generator=gen, device=device)[:8]] *= 20.0  # a few outlier channels
    return x


def n_copies(bytes_per_copy: int) -> int:
    return max(1, min(MAX_COPIES, ROTATE_BYTES // max(1, bytes_per_copy)))


def build(impl: str, m: int, n: int, k: int, w: torch.Tensor, x: torch.Tensor, backend: str):
    """Returns (list of per-copy closures, bytes per copy). Each copy owns distinct input and weight memory."""
    if impl == "torch_fp32":
        per = (m * k + n * k) * 4
        return [(lambda x=x.clone(), w=w.clone(): F.linear(x, w)) for _ in range(n_copies(per))], per

    if impl == "fbgemm_int8":
        per = m * k * 4 + n * k
        calls = []
        for _ in range(n_copies(per)):
            lin = nn.Linear(k, n, bias=False)
            with torch.no_grad():
                lin.weight.copy_(w)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]
            calls.append(lambda q=q, x=x.clone(): q(x))
        return calls, per

    bias = torch.randn(n) * 0.1
    if impl in ("w8a8", "w8a8_gemm", "w8a8_no_epilogue"):
        codes, w_scale = quantize_weights(w, 8)
        per = n * k + (m * k * 4 if impl == "w8a8" else m * k)
        calls = []
        for _ in range(n_copies(per)):
            packed = osengine.pack_weights(codes, bits=8, backend=backend)
            if impl == "w8a8":
                def call(x=x.clone(), packed=packed):
                    q = osengine.quantize_activations(x, bits=8, symmetric=False, backend=backend)
                    return osengine.gemm(q.codes, packed, a_scale=q.scale, a_zero_point=q.zero_point,
                                         w_scale=w_scale, bias=bias)
            else:
                q = osengine.quantize_activations(x, bits=8, symmetric=False, backend=backend)
                if impl == "w8a8_gemm":
                    out = torch.empty(m, n)
                    def call(q=q, packed=packed, out=out):
                        return osengine.gemm(q.codes, packed, a_scale=q.scale, a_zero_point=q.zero_point,
                                             w_scale=w_scale, bias=bias, out=out)
                else:
                    out = torch.empty(m, n, dtype=torch.int32)
                    def call(q=q, packed=packed, out=out):
                        return osengine.gemm_accumulate(q.codes, packed, out=out)
            calls.append(call)
        return calls, per

    codes4, w_scale = quantize_weights(w, 4)
    packed_codes = osengine.pack_int4(codes4)
    per = n * k // 2 + m * k * 4
    calls = []
    for _ in range(n_copies(per)):
        packed = osengine.pack_weights(packed_codes, bits=4, backend=backend)
        if impl == "w4a8":
            def call(x=x.clone(), packed=packed):
                q = osengine.quantize_activations(x, bits=8, symmetric=False, backend=backend)
                return osengine.gemm(q.codes, packed, a_scale=q.scale, a_zero_point=q.zero_point,
                                     w_scale=w_scale, bias=bias)
        else:  # w4a4
            def call(x=x.clone(), packed=packed):
                q = osengine.quantize_activations(x, bits=4, symmetric=False, backend=backend)
                return osengine.gemm_w4a4(osengine.pack_int4(q.codes), packed, a_scale=q.scale,
                                          a_zero_point=q.zero_point, w_scale=w_scale, bias=bias)
        calls.append(call)
    return calls, per


def build_rotate(impl: str, m: int, n: int, k: int, w: torch.Tensor, gate_up: torch.Tensor, backend: str):
    """--rotate: (per-copy closures, bytes per copy) of one impl on down_proj's input gate_up = [gate | up] [M, 2K]."""
    if impl in ("quantize", "quantize_rotate"):
        rotate = impl == "quantize_rotate"
        per = m * 2 * k * 4
        options = dict(bits=8, symmetric=False, silu_gate=True, rotate=rotate, backend=backend)
        return [(lambda x=gate_up.clone(): osengine.quantize_activations(x, **options))
                for _ in range(n_copies(per))], per
    codes, w_scale = quantize_weights(w, 8)
    bias = torch.randn(n) * 0.1
    q = osengine.quantize_activations(gate_up, bits=8, symmetric=False, silu_gate=True, rotate=True, backend=backend)
    per = n * k + m * k
    calls = []
    for _ in range(n_copies(per)):
        packed = osengine.pack_weights(codes, bits=8, backend=backend)
        out = torch.empty(m, n)
        calls.append(lambda q=q, packed=packed, out=out: osengine.gemm(
            q.codes, packed, a_scale=q.scale, a_zero_point=q.zero_point, w_scale=w_scale, bias=bias, out=out))
    return calls, per


def run_rotate(args) -> list[dict]:
    device = device_name(args.threads)
    gen = torch.Generator().manual_seed(0)
    records = []
    for label, n, k in ROTATE_SHAPES:
        w = torch.randn(n, k, generator=gen) * 0.02
        for m in args.m:
            gate_up = torch.randn(m, 2 * k, generator=gen)
            builds = {impl: build_rotate(impl, m, n, k, w, gate_up, args.backend) for impl in ROTATE_IMPLS}
            with torch.inference_mode():
                timings = measure({impl: calls for impl, (calls, _) in builds.items()}, args.min_time, args.repeats)
            copies = {impl: len(calls) for impl, (calls, _) in builds.items()}
            del builds
            for impl, samples in timings.items():
                med = statistics.median(samples)
                q1, q3 = quartiles(samples)
                rec = {"device": device, "impl": impl, "m": m, "n": n, "k": k, "ms": med * 1e3, "shape": label,
                       "min_ms": min(samples) * 1e3, "max_ms": max(samples) * 1e3, "iqr_ms": (q3 - q1) * 1e3,
                       "samples": len(samples), "copies": copies[impl], "backend": args.backend_name}
                records.append(rec)
                print(f"  {label:16s} M={m:<5d} {impl:17s} {rec['ms']:10.4f} ms  (x{rec['copies']} copies, "
                      f"{len(samples)} samples)", file=sys.stderr, flush=True)
    for rec in records:
        for key in ("ms", "min_ms", "max_ms", "iqr_ms"):
            rec[key] = round(rec[key], 5)
    return records


def rotate_points(records: list[dict]) -> dict:
    """{(shape, n, k, m): {impl: record}} of --rotate records, in measurement order."""
    rows = {}
    for r in records:
        rows.setdefault((r["shape"], r["n"], r["k"], r["m"]), {})[r["impl"]] = r
    return rows


def rotate_cost(row: dict):
    """(quantize_rotate - quantize) / w8a8_gemm of one point, or None when an impl is missing."""
    if not all(i in row for i in ROTATE_IMPLS):
        return None
    return (row["quantize_rotate"]["ms"] - row["quantize"]["ms"]) / row["w8a8_gemm"]["ms"]


def rotate_table(records: list[dict]) -> str:
    rows = rotate_points(records)
    key_w = max(len(f"{s} {n}x{k}") for s, n, k, _ in rows) + 2
    out = ["ms per call (median, +-half the IQR relative to the median); rotation = quantize_rotate - quantize; "
           "cost = rotation / w8a8_gemm",
           f"{'shape (N x K)':<{key_w}}{'M':>6}  " + "".join(f"{i:>17}" for i in ROTATE_IMPLS) +
           f"{'rotation':>12}{'cost':>9}"]
    for (s, n, k, m), row in rows.items():
        cells = []
        for i in ROTATE_IMPLS:
            r = row.get(i)
            cells.append(f"{r['ms']:>10.4f} +-{50 * r['iqr_ms'] / r['ms']:>2.0f}%" if r else f"{'-':>17}")
        cost = rotate_cost(row)
        extra = (f"{row['quantize_rotate']['ms'] - row['quantize']['ms']:>12.4f}{100 * cost:>8.1f}%"
                 if cost is not None else f"{'-':>12}{'-':>9}")
        out.append(f"{s + f' {n}x{k}':<{key_w}}{m:>6}  " + "".join(f"{c:>17}" for c in cells) + extra)
    return "\n".join(out)


def rotate_targets(records: list[dict]) -> list[str]:
    vals = [(cost, s, n, k, m) for (s, n, k, m), row in rotate_points(records).items()
            if m >= 16 and (cost := rotate_cost(row)) is not None]
    desc = "rotation (quantize_rotate - quantize) <= 5% of the down_proj GEMM at M >= 16"
    if not vals:
        return ["Targets:", f"  SKIP  {desc}: not measured"]
    ok = [v for v in vals if v[0] <= 0.05]
    worst = max(vals)
    return ["Targets:", f"  {'PASS' if len(ok) == len(vals) else 'FAIL'}  {desc}: worst {100 * worst[0]:+.1f}% at "
                        f"{worst[1]} N={worst[2]} K={worst[3]} M={worst[4]} ({len(ok)}/{len(vals)} points meet it)"]


class Timer:
    """Samples of one impl: per-call seconds, one sample per call (or per batch of fast calls), rotating copies."""

    def __init__(self, calls):
        self.calls, self.i, self.samples, self.spent = calls, 0, [], 0.0
        t0 = time.perf_counter()
        for _ in range(max(2, len(calls))):  # warm-up: one pass over the copies, at least 2 calls
            self.call()
        est = (time.perf_counter() - t0) / self.i
        self.batch = max(1, int(BATCH_SECONDS / max(est, 1e-9)))

    def call(self):
        self.calls[self.i % len(self.calls)]()
        self.i += 1

    def sample(self):
        t = time.perf_counter()
        for _ in range(self.batch):
            self.call()
        dt = time.perf_counter() - t
        self.spent += dt
        self.samples.append(dt / self.batch)


def measure(builds: dict, min_time: float, repeats: int) -> dict:
    """Samples every impl of one point round-robin (so that a change in machine load hits them all alike) until each
    has at least `repeats` samples and `min_time` seconds measured. Returns {impl: [seconds per call]}."""
    return measure_timers({impl: Timer(calls) for impl, calls in builds.items()}, min_time, repeats)


def measure_timers(timers: dict, min_time: float, repeats: int) -> dict:
    while True:
        pending = [t for t in timers.values() if len(t.samples) < repeats or t.spent < min_time]
        if not pending:
            return {impl: t.samples for impl, t in timers.items()}
        for t in pending:
            t.sample()


# ---- CUDA -----------------------------------------------------------------------------------------------------------
# Written without a GPU at hand: not run yet (see the module docstring).

CUDA_MAX_COPIES = 256
CUDA_BATCH_SECONDS = 2e-3  # GPU time per sample, at least
CUDA_MAX_GRAPH_CALLS = 1024
DEFAULT_L2_BYTES = 50 << 20  # H100


def cuda_unavailable() -> str | None:
    """Why --device cuda cannot run here (one line), or None."""
    reasons = []
    if not torch.cuda.is_available():
        reasons.append(f"torch {torch.__version__} sees no GPU" +
                       ("" if torch.version.cuda else " (a CPU-only build of torch)"))
    if not has_cuda_backend():
        reasons.append("osengine was built without the CUDA backend (build it with OSENGINE_CUDA=ON, see "
                       "cpp/src/backends/cuda/README.md)")
    return "; ".join(reasons) or None


def cuda_device_name() -> str:
    return f"cuda: {torch.cuda.get_device_name()}"


def cuda_copies(bytes_per_copy: int, rotate_bytes: int, budget_bytes: int) -> int:
    """Copies to rotate over: enough to cover rotate_bytes (3x L2), as many as the memory budget allows, at least 1."""
    want = -(-rotate_bytes // max(1, bytes_per_copy))
    return max(1, min(CUDA_MAX_COPIES, want, budget_bytes // max(1, bytes_per_copy)))


def build_cuda(impl: str, m: int, n: int, k: int, w: torch.Tensor, x: torch.Tensor, rotate_bytes: int,
               budget_bytes: int):
    """As build(), on the GPU: x fp16 [M, K] and w fp32 [N, K] live on the GPU. Returns (closures, bytes per copy),
    or (None, bytes per copy) when the impl refuses this shape (torch._int_mm)."""
    def copies(per):
        return range(cuda_copies(per, rotate_bytes, budget_bytes))

    if impl == "torch_fp16":
        per = (m * k + n * k) * 2
        wh = w.half()
        return [(lambda x=x.clone(), w=wh.clone(): F.linear(x, w)) for _ in copies(per)], per

    if impl == "torch_int_mm":
        per = m * k + n * k
        a_codes = quantize_weights(x.float(), 8)[0]  # per-token symmetric int8 codes stand in for the activations
        w_codes = quantize_weights(w, 8)[0]
        try:
            torch._int_mm(a_codes, w_codes.t())
            torch.cuda.synchronize()
        except (RuntimeError, NotImplementedError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"  torch_int_mm refuses M={m} N={n} K={k} (nothing recorded): {msg}", file=sys.stderr, flush=True)
            return None, per
        return [(lambda a=a_codes.clone(), wt=w_codes.clone().t(): torch._int_mm(a, wt)) for _ in copies(per)], per

    bias = torch.randn(n, device=x.device) * 0.1
    if impl in ("w8a8", "w8a8_gemm", "w8a8_no_epilogue"):
        codes, w_scale = quantize_weights(w, 8)
        codes = codes.cpu()  # packed on the host and uploaded (pack_weights would download GPU codes first)
        per = n * k + (m * k * 2 if impl == "w8a8" else m * k)
        calls = []
        for _ in copies(per):
            packed = osengine.pack_weights(codes, bits=8, backend="cuda")
            if impl == "w8a8":
                def call(x=x.clone(), packed=packed):
                    q = osengine.quantize_activations(x, bits=8, symmetric=False)
                    return osengine.gemm(q.codes, packed, a_scale=q.scale, a_zero_point=q.zero_point,
                                         w_scale=w_scale, bias=bias, out_dtype="float16")
            else:
                q = osengine.quantize_activations(x.clone(), bits=8, symmetric=False)
                if impl == "w8a8_gemm":
                    out = torch.empty(m, n, dtype=torch.float16, device=x.device)
                    def call(q=q, packed=packed, out=out):
                        return osengine.gemm(q.codes, packed, a_scale=q.scale, a_zero_point=q.zero_point,
                                             w_scale=w_scale, bias=bias, out=out)
                else:
                    out = torch.empty(m, n, dtype=torch.int32, device=x.device)
                    def call(q=q, packed=packed, out=out):
                        return osengine.gemm_accumulate(q.codes, packed, out=out)
            calls.append(call)
        return calls, per

    codes4, w_scale = quantize_weights(w, 4)
    packed_codes = osengine.pack_int4(codes4.cpu())
    per = n * k // 2 + m * k * 2
    calls = []
    for _ in copies(per):
        packed = osengine.pack_weights(packed_codes, bits=4, backend="cuda")
        if impl == "w4a8":
            def call(x=x.clone(), packed=packed):
                q = osengine.quantize_activations(x, bits=8, symmetric=False)
                return osengine.gemm(q.codes, packed, a_scale=q.scale, a_zero_point=q.zero_point,
                                     w_scale=w_scale, bias=bias, out_dtype="float16")
        else:  # w4a4
            def call(x=x.clone(), packed=packed):
                q = osengine.quantize_activations(x, bits=4, symmetric=False)
                return osengine.gemm_w4a4(osengine.pack_int4(q.codes), packed, a_scale=q.scale,
                                          a_zero_point=q.zero_point, w_scale=w_scale, bias=bias, out_dtype="float16")
        calls.append(call)
    return calls, per


class CudaTimer:
    """Samples of one impl on the GPU: a batch of calls over the rotating copies (a multiple of their number, about
    CUDA_BATCH_SECONDS of GPU time) between two CUDA events, replayed from a CUDA graph when `graph` (falls back to
    eager calls if the capture fails; `note` then says why)."""

    def __init__(self, calls, graph: bool):
        self.calls, self.i, self.samples, self.spent = calls, 0, [], 0.0
        self.graph, self.note = None, None
        n = len(calls)
        side = torch.cuda.Stream()  # warm-up off the default stream (torch's advice before a capture)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(3, n)):
                self.call()
        torch.cuda.current_stream().wait_stream(side)
        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.start.record()
        for _ in range(n):
            self.call()
        self.end.record()
        self.end.synchronize()
        est = self.start.elapsed_time(self.end) / 1e3 / n
        batch = max(1, math.ceil(CUDA_BATCH_SECONDS / max(est, 1e-9)))
        self.batch = max(n, min(CUDA_MAX_GRAPH_CALLS, -(-batch // n) * n))
        if graph:
            try:
                self.capture()
                # The eager estimate includes host overhead, which the graph does not have: grow the batch (once)
                # if a replay is much shorter than CUDA_BATCH_SECONDS.
                dt = self.replay_seconds()
                if dt < CUDA_BATCH_SECONDS / 2 and self.batch < CUDA_MAX_GRAPH_CALLS:
                    grow = math.ceil(CUDA_BATCH_SECONDS / max(dt, 1e-9))
                    self.batch = max(n, min(CUDA_MAX_GRAPH_CALLS, -(-self.batch * grow // n) * n))
                    self.graph = None
                    self.capture()
            except Exception as e:  # noqa: BLE001 - any capture failure: time eagerly and say why
                torch.cuda.synchronize()
                self.graph = None
                text = str(e).strip()
                self.note = f"CUDA graph capture failed ({type(e).__name__}: {text.splitlines()[0] if text else ''})"
        self.i = 0

    def capture(self):
        self.i = 0
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(self.batch):
                self.call()
        g.replay()  # the first replay uploads the graph: warm-up
        torch.cuda.synchronize()
        self.graph = g

    def replay_seconds(self) -> float:
        self.start.record()
        self.graph.replay()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3

    def call(self):
        self.calls[self.i % len(self.calls)]()
        self.i += 1

    def sample(self):
        self.start.record()
        if self.graph is not None:
            self.graph.replay()
        else:
            for _ in range(self.batch):
                self.call()
        self.end.record()
        self.end.synchronize()
        dt = self.start.elapsed_time(self.end) / 1e3
        self.spent += dt
        self.samples.append(dt / self.batch)


def run_cuda(args) -> list[dict]:
    device = cuda_device_name()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES
    rotate_bytes = 3 * l2
    gen = torch.Generator(device="cuda").manual_seed(0)
    records = []
    start = time.perf_counter()
    for label, n, k in args.shapes:
        w = torch.randn(n, k, generator=gen, device="cuda") * 0.02
        measured = {}  # impl: [(m, seconds per call)] at this shape, for --max-call-s
        for m in args.m:
            if args.time_limit and time.perf_counter() - start > args.time_limit:
                print(f"  {label:16s} M={m:<5d} not measured: --time-limit {args.time_limit:g} s reached",
                      file=sys.stderr, flush=True)
                continue
            x = make_x(m, k, gen, device="cuda").half()
            impls = []
            for impl in args.impl:
                prior = [(pm, sec) for pm, sec in measured.get(impl, []) if pm < m]
                if prior:
                    pm, sec = max(prior)
                    if sec * m / pm > args.max_call_s:
                        print(f"  {label:16s} M={m:<5d} {impl:17s} skipped: predicted {sec * m / pm:.3g} s per call "
                              f"(from M={pm}) > --max-call-s {args.max_call_s:g}", file=sys.stderr, flush=True)
                        continue
                impls.append(impl)
            if not impls:
                continue
            gc.collect()
            torch.cuda.empty_cache()
            budget = torch.cuda.mem_get_info()[0] // 2 // len(impls)
            builds = {}
            for impl in impls:
                calls, _ = build_cuda(impl, m, n, k, w, x, rotate_bytes, budget)
                if calls is not None:
                    builds[impl] = calls
            with torch.inference_mode():
                timers = {impl: CudaTimer(calls, args.cuda_graph) for impl, calls in builds.items()}
                for impl, t in timers.items():
                    if t.note:
                        print(f"  {label:16s} M={m:<5d} {impl:17s} timed eagerly: {t.note}", file=sys.stderr,
                              flush=True)
                timings = measure_timers(timers, args.min_time, args.repeats)
            timing = {impl: "graph" if t.graph is not None else "eager" for impl, t in timers.items()}
            copies = {impl: len(calls) for impl, calls in builds.items()}
            del builds, timers
            for impl, samples in timings.items():
                med = statistics.median(samples)
                measured.setdefault(impl, []).append((m, med))
                q1, q3 = quartiles(samples)
                rec = {"device": device, "impl": impl, "m": m, "n": n, "k": k, "ms": med * 1e3,
                       "shape": label, "min_ms": min(samples) * 1e3, "max_ms": max(samples) * 1e3,
                       "iqr_ms": (q3 - q1) * 1e3, "samples": len(samples), "gops": 2 * m * n * k / med / 1e9,
                       "copies": copies[impl], "backend": args.backend_name, "timing": timing[impl]}
                records.append(rec)
                print(f"  {label:16s} M={m:<5d} {impl:17s} {rec['ms']:10.3f} ms  {rec['gops']:8.1f} GOP/s  "
                      f"(x{rec['copies']} copies, {len(samples)} samples, {timing[impl]})", file=sys.stderr, flush=True)
        del w
    for rec in records:
        for key in ("ms", "min_ms", "max_ms", "iqr_ms", "gops"):
            rec[key] = round(rec[key], 5)
    return records


def quartiles(xs: list[float]):
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def run(args) -> list[dict]:
    device = device_name(args.threads)
    gen = torch.Generator().manual_seed(0)
    records = []
    for label, n, k in args.shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        for m in args.m:
            x = make_x(m, k, gen)
            builds = {impl: build(impl, m, n, k, w, x, args.backend) for impl in args.impl}
            with torch.inference_mode():
                timings = measure({impl: calls for impl, (calls, _) in builds.items()}, args.min_time, args.repeats)
            copies = {impl: len(calls) for impl, (calls, _) in builds.items()}
            del builds
            for impl, samples in timings.items():
                med = statistics.median(samples)
                q1, q3 = quartiles(samples)
                rec = {"device": device, "impl": impl, "m": m, "n": n, "k": k, "ms": med * 1e3,
                       "shape": label, "min_ms": min(samples) * 1e3, "max_ms": max(samples) * 1e3,
                       "iqr_ms": (q3 - q1) * 1e3, "samples": len(samples), "gops": 2 * m * n * k / med / 1e9,
                       "copies": copies[impl], "backend": args.backend_name}
                records.append(rec)
                print(f"  {label:16s} M={m:<5d} {impl:17s} {rec['ms']:10.3f} ms  {rec['gops']:8.1f} GOP/s  "
                      f"(x{rec['copies']} copies, {len(samples)} samples)", file=sys.stderr, flush=True)
    for rec in records:
        for key in ("ms", "min_ms", "max_ms", "iqr_ms", "gops"):
            rec[key] = round(rec[key], 5)
    return records


TABLE = {  # device: (baseline impl, (ratio label, impl, peer): peer time / impl time, header of the GOP/s table)
    "cpu": ("torch_fp32", ("w8a8/fbgemm", "w8a8", "fbgemm_int8"),
            "GOP/s (speedup vs torch_fp32); w8a8/fbgemm speedup; epilogue cost = w8a8_gemm / w8a8_noepi - 1"),
    "cuda": ("torch_fp16", ("w8a8g/int_mm", "w8a8_gemm", "torch_int_mm"),
             "GOP/s (speedup vs torch_fp16); w8a8g/int_mm = torch_int_mm / w8a8_gemm time; "
             "epilogue cost = w8a8_gemm / w8a8_noepi - 1"),
}


def table(records: list[dict], impls: list[str], device: str = "cpu") -> str:
    baseline, speedup_col, title = TABLE[device]
    rows = {}
    for r in records:
        rows.setdefault((r["shape"], r["n"], r["k"], r["m"]), {})[r["impl"]] = r
    key_w = max(len(f"{s} {n}x{k}") for s, n, k, _ in rows) + 2
    head = f"{'shape (N x K)':<{key_w}}{'M':>6}  "
    out = ["ms per call (median, +-half the IQR relative to the median)",
           head + "".join(f"{SHORT.get(i, i):>15}" for i in impls)]
    for (s, n, k, m), row in rows.items():
        cells = []
        for i in impls:
            r = row.get(i)
            cells.append(f"{r['ms']:>9.3f} +-{50 * r['iqr_ms'] / r['ms']:>2.0f}%" if r else f"{'-':>15}")
        out.append(f"{s + f' {n}x{k}':<{key_w}}{m:>6}  " + "".join(f"{c:>15}" for c in cells))

    ratio_cols = [speedup_col, ("epilogue", "w8a8_gemm", "w8a8_no_epilogue")]
    out += ["", title,
            head + "".join(f"{SHORT.get(i, i):>15}" for i in impls) + "".join(f"{c:>13}" for c, _, _ in ratio_cols)]
    for (s, n, k, m), row in rows.items():
        fp = row.get(baseline)
        cells = []
        for i in impls:
            r = row.get(i)
            if r is None:
                cells.append("-")
            elif fp is None:
                cells.append(f"{r['gops']:.1f}")
            else:
                cells.append(f"{r['gops']:.1f} ({fp['ms'] / r['ms']:.2f}x)")
        a, b = row.get(speedup_col[1]), row.get(speedup_col[2])
        cells.append(f"{b['ms'] / a['ms']:.2f}x" if a and b else "-")
        a, b = row.get("w8a8_gemm"), row.get("w8a8_no_epilogue")
        cells.append(f"{100 * (a['ms'] / b['ms'] - 1):+.1f}%" if a and b else "-")
        widths = [15] * len(impls) + [13] * len(ratio_cols)
        out.append(f"{s + f' {n}x{k}':<{key_w}}{m:>6}  " + "".join(f"{c:>{wd}}" for c, wd in zip(cells, widths)))
    eager = [r for r in records if r.get("timing") == "eager"]
    if eager and any(r.get("timing") == "graph" for r in records):
        out += ["", "timed eagerly (CUDA graph capture failed; host overhead included): " +
                ", ".join(f"{r['impl']} {r['shape']} M={r['m']}" for r in eager)]
    return "\n".join(out)


def target_results(records: list[dict], device: str = "cpu") -> list[tuple[str, str, str]]:
    """(target, measured, PASS / FAIL / SKIP) for the issue's targets on LLaMA shapes (CPU: LLaMA-7B; CUDA: LLaMA-7B
    and -70B), computed from the measurements; `measured` names the worst point and how many points meet it."""
    families = ["llama7b"] if device == "cpu" else ["llama7b", "llama70b"]
    llama = {(n, k) for f in families for _, n, k in SHAPES[f]}
    pts = {}
    for r in records:
        if (r["n"], r["k"]) in llama:
            pts.setdefault((r["n"], r["k"], r["m"]), {})[r["impl"]] = r["ms"]
    if device == "cpu":
        checks = [  # (description, numerator impl, denominator impl, predicate on M, bound, higher is better)
            ("W8A8 >= 2.0x torch fp32 at M >= 128", "torch_fp32", "w8a8", lambda m: m >= 128, 2.0, True),
            ("W8A8 >= 1.2x FBGEMM int8 at M >= 128", "fbgemm_int8", "w8a8", lambda m: m >= 128, 1.2, True),
            ("W8A8 >= 3.5x torch fp32 at M = 1", "torch_fp32", "w8a8", lambda m: m == 1, 3.5, True),
            ("W4A8 >= 6.0x torch fp32 at M = 1", "torch_fp32", "w4a8", lambda m: m == 1, 6.0, True),
            ("epilogue (w8a8_gemm / w8a8_no_epilogue - 1) <= 5%", "w8a8_gemm", "w8a8_no_epilogue", lambda m: True,
             1.05, False),
        ]
    else:
        checks = [
            ("W8A8 >= 1.8x torch fp16 at M >= 2048", "torch_fp16", "w8a8", lambda m: m >= 2048, 1.8, True),
            ("W8A8 GEMM (w8a8_gemm) >= 1.0x torch._int_mm at every M", "torch_int_mm", "w8a8_gemm", lambda m: True,
             1.0, True),
            ("epilogue (w8a8_gemm / w8a8_no_epilogue - 1) <= 3%", "w8a8_gemm", "w8a8_no_epilogue", lambda m: True,
             1.03, False),
            ("W4A8 >= 2.5x torch fp16 at M <= 16", "torch_fp16", "w4a8", lambda m: m <= 16, 2.5, True),
        ]
    out = []
    for desc, num, den, pick, bound, higher in checks:
        vals = [(v[num] / v[den], n, k, m) for (n, k, m), v in sorted(pts.items())
                if pick(m) and num in v and den in v]
        if not vals:
            out.append((desc, "not measured", "SKIP"))
            continue
        ok = [v for v in vals if (v[0] >= bound if higher else v[0] <= bound)]
        worst = min(vals) if higher else max(vals)
        shown = f"{worst[0]:.2f}x" if higher else f"{100 * (worst[0] - 1):+.1f}%"
        out.append((desc, f"worst {shown} at N={worst[1]} K={worst[2]} M={worst[3]} "
                          f"({len(ok)}/{len(vals)} points meet it)", "PASS" if len(ok) == len(vals) else "FAIL"))
    return out


def targets(records: list[dict], device: str = "cpu") -> list[str]:
    """The target_results as lines under a heading."""
    heading = "Targets (LLaMA-7B shapes):" if device == "cpu" else "Targets (LLaMA-7B and LLaMA-70B shapes):"
    return [heading] + [f"  {verdict}  {desc}: {measured}" for desc, measured, verdict in
                        target_results(records, device)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="all", choices=["all", *SHAPES],
                   help="all (default): cpu smollm2 + llama7b, cuda llama7b + llama70b")
    p.add_argument("--m", default=None, help="comma-separated token counts (default: cpu " +
                   ",".join(map(str, DEFAULT_M)) + "; cuda " + ",".join(map(str, CUDA_DEFAULT_M)) + ")")
    p.add_argument("--impl", default=None, help="comma-separated subset of: cpu " + ", ".join(IMPLS) +
                   "; cuda " + ", ".join(CUDA_IMPLS) + " (default: all of the device's)")
    p.add_argument("--threads", type=int, default=2, help="torch and osengine threads (default 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    p.add_argument("--backend", default="auto", help="osengine CPU backend: auto, avx2, reference (cuda: auto, cuda)")
    p.add_argument("--min-time", type=float, default=0.2, help="minimum measured seconds per point (default 0.2)")
    p.add_argument("--repeats", type=int, default=5, help="minimum samples per point (default 5)")
    p.add_argument("--cuda-graph", default=True, action=argparse.BooleanOptionalAction,
                   help="cuda: replay each batch of calls from a CUDA graph (default) or call eagerly")
    p.add_argument("--max-call-s", type=float, default=2.0,
                   help="cuda: skip an impl at a larger M when its time at a smaller M, scaled by M, predicts a call "
                        "longer than this (default 2 s)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="--device cuda: start no new point after S seconds; the points measured are reported")
    p.add_argument("--json", action="store_true", help="print one JSON list of records instead of the table")
    p.add_argument("--rotate", action="store_true",
                   help="cpu: the online Hadamard rotation's cost on down_proj inputs (its own shapes, impls and "
                        "default M " + ",".join(map(str, ROTATE_DEFAULT_M)) + "; see the docstring)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    impls = CUDA_IMPLS if cuda else IMPLS
    if args.rotate and (cuda or args.shapes != "all" or args.impl is not None):
        p.error("--rotate runs on the CPU with its own shapes and impls: drop --device cuda, --shapes and --impl")
    if args.shapes == "all":
        args.shapes = [s for family in DEFAULT_SHAPES[args.device] for s in SHAPES[family]]
    else:
        args.shapes = SHAPES[args.shapes]
    if args.m is None:
        args.m = ",".join(map(str, CUDA_DEFAULT_M if cuda else (ROTATE_DEFAULT_M if args.rotate else DEFAULT_M)))
    try:
        args.m = [int(v) for v in args.m.split(",") if v.strip()]
    except ValueError:
        p.error(f"--m {args.m!r}: expected comma-separated integers")
    if not args.m or min(args.m) < 1:
        p.error("--m: token counts must be >= 1")
    if args.impl is None:
        args.impl = ",".join(impls)
    args.impl = [v.strip() for v in args.impl.split(",") if v.strip()]
    bad = [v for v in args.impl if v not in impls]
    if bad or not args.impl:
        p.error(f"--impl: unknown {bad} for --device {args.device}; choose from {', '.join(impls)}")
    args.impl = [i for i in impls if i in args.impl]  # canonical column order
    if args.threads < 1 or args.repeats < 1 or args.min_time < 0:
        p.error("--threads and --repeats must be >= 1, --min-time >= 0")
    if cuda and args.backend not in ("auto", "cuda"):
        p.error(f"--backend {args.backend!r}: --device cuda runs the osengine CUDA backend ('auto' or 'cuda')")
    if cuda and args.max_call_s <= 0:
        p.error("--max-call-s must be > 0")
    if args.time_limit is not None and args.time_limit <= 0:
        p.error("--time-limit must be > 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda":
        return main_cuda(args)
    torch.set_num_threads(args.threads)
    osengine.set_num_threads(args.threads)
    torch.backends.quantized.engine = "fbgemm"
    backend = args.backend_name = osengine.best_cpu_backend() if args.backend == "auto" else args.backend
    print(f"{device_name(args.threads)}; osengine {osengine.__version__} backend {backend}; torch {torch.__version__}",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    if args.rotate:
        records = run_rotate(args)
        if args.json:
            print(json.dumps(records, indent=1))
            return
        print(f"{records[0]['device']}; osengine backend {backend}; torch {torch.__version__}; "
              f"{time.perf_counter() - t0:.0f} s")
        print(rotate_table(records))
        print()
        print("\n".join(rotate_targets(records)))
        return
    records = run(args)
    if args.json:
        print(json.dumps(records, indent=1))
        return
    print(f"{records[0]['device']}; osengine backend {backend}; torch {torch.__version__}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(table(records, args.impl))
    print()
    print("\n".join(targets(records)))


def main_cuda(args) -> None:
    reason = cuda_unavailable()
    if reason:
        sys.exit(f"gemm.py: error: --device cuda: {reason}")
    torch.set_num_threads(args.threads)  # host-side work only (weight packing)
    osengine.set_num_threads(args.threads)
    args.backend_name = "cuda"
    timing = "CUDA graphs" if args.cuda_graph else "eager calls"
    print(f"{cuda_device_name()}; osengine {osengine.__version__} backend cuda; torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}); timing {timing}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    records = run_cuda(args)
    if args.json:
        print(json.dumps(records, indent=1))
        return
    if not records:
        sys.exit("gemm.py: error: nothing was measured")
    print(f"{records[0]['device']}; osengine backend cuda; torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"timing {timing}; {time.perf_counter() - t0:.0f} s")
    print(table(records, args.impl, "cuda"))
    print()
    print("\n".join(targets(records, "cuda")))

if __name__ == "__main__":
    main()
