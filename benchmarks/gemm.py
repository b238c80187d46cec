"""GEMM speed of osengine (W8A8, W4A8, W4A4) against torch fp32 and FBGEMM dynamic int8, on real models' linears.

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
"""
from __future__ import annotations

import argparse
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

SHAPES = {  # name: (N, K)
    "smollm2": [("smollm2 q/o", 576, 576), ("smollm2 up/gate", 1536, 576), ("smollm2 down", 576, 1536)],
    "llama7b": [("llama7b q/k/v/o", 4096, 4096), ("llama7b up/gate", 11008, 4096), ("llama7b down", 4096, 11008)],
}
IMPLS = ["torch_fp32", "fbgemm_int8", "w8a8", "w8a8_gemm", "w8a8_no_epilogue", "w4a8", "w4a4"]
SHORT = {"torch_fp32": "fp32", "fbgemm_int8": "fbgemm", "w8a8_no_epilogue": "w8a8_noepi"}
DEFAULT_M = [1, 16, 128, 512, 2048]
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


def make_x(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[:8]] *= 20.0  # a few outlier channels
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
    timers = {impl: Timer(calls) for impl, calls in builds.items()}
    while True:
        pending = [t for t in timers.values() if len(t.samples) < repeats or t.spent < min_time]
        if not pending:
            return {impl: t.samples for impl, t in timers.items()}
        for t in pending:
            t.sample()


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


def table(records: list[dict], impls: list[str]) -> str:
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

    ratio_cols = [("w8a8/fbgemm", "w8a8", "fbgemm_int8"), ("epilogue", "w8a8_gemm", "w8a8_no_epilogue")]
    out += ["", "GOP/s (speedup vs torch_fp32); w8a8/fbgemm speedup; epilogue cost = w8a8_gemm / w8a8_noepi - 1",
            head + "".join(f"{SHORT.get(i, i):>15}" for i in impls) + "".join(f"{c:>13}" for c, _, _ in ratio_cols)]
    for (s, n, k, m), row in rows.items():
        fp = row.get("torch_fp32")
        cells = []
        for i in impls:
            r = row.get(i)
            if r is None:
                cells.append("-")
            elif fp is None:
                cells.append(f"{r['gops']:.1f}")
            else:
                cells.append(f"{r['gops']:.1f} ({fp['ms'] / r['ms']:.2f}x)")
        a, b = row.get("w8a8"), row.get("fbgemm_int8")
        cells.append(f"{b['ms'] / a['ms']:.2f}x" if a and b else "-")
        a, b = row.get("w8a8_gemm"), row.get("w8a8_no_epilogue")
        cells.append(f"{100 * (a['ms'] / b['ms'] - 1):+.1f}%" if a and b else "-")
        widths = [15] * len(impls) + [13] * len(ratio_cols)
        out.append(f"{s + f' {n}x{k}':<{key_w}}{m:>6}  " + "".join(f"{c:>{wd}}" for c, wd in zip(cells, widths)))
    return "\n".join(out)


def targets(records: list[dict]) -> list[str]:
    """PASS/FAIL lines for the issue's targets on LLaMA-7B shapes, computed from the measurements."""
    llama = {(n, k) for _, n, k in SHAPES["llama7b"]}
    pts = {}
    for r in records:
        if (r["n"], r["k"]) in llama:
            pts.setdefault((r["n"], r["k"], r["m"]), {})[r["impl"]] = r["ms"]
    checks = [  # (description, numerator impl, denominator impl, predicate on M, bound, higher is better)
        ("W8A8 >= 2.0x torch fp32 at M >= 128", "torch_fp32", "w8a8", lambda m: m >= 128, 2.0, True),
        ("W8A8 >= 1.2x FBGEMM int8 at M >= 128", "fbgemm_int8", "w8a8", lambda m: m >= 128, 1.2, True),
        ("W8A8 >= 3.5x torch fp32 at M = 1", "torch_fp32", "w8a8", lambda m: m == 1, 3.5, True),
        ("W4A8 >= 6.0x torch fp32 at M = 1", "torch_fp32", "w4a8", lambda m: m == 1, 6.0, True),
        ("epilogue (w8a8_gemm / w8a8_no_epilogue - 1) <= 5%", "w8a8_gemm", "w8a8_no_epilogue", lambda m: True,
         1.05, False),
    ]
    lines = ["Targets (LLaMA-7B shapes):"]
    for desc, num, den, pick, bound, higher in checks:
        vals = [(v[num] / v[den], n, k, m) for (n, k, m), v in sorted(pts.items())
                if pick(m) and num in v and den in v]
        if not vals:
            lines.append(f"  SKIP  {desc}: not measured")
            continue
        ok = [v for v in vals if (v[0] >= bound if higher else v[0] <= bound)]
        worst = min(vals) if higher else max(vals)
        shown = f"{worst[0]:.2f}x" if higher else f"{100 * (worst[0] - 1):+.1f}%"
        verdict = "PASS" if len(ok) == len(vals) else "FAIL"
        lines.append(f"  {verdict}  {desc}: worst {shown} at N={worst[1]} K={worst[2]} M={worst[3]} "
                     f"({len(ok)}/{len(vals)} points meet it)")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="all", choices=["all", "smollm2", "llama7b"])
    p.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="comma-separated token counts")
    p.add_argument("--impl", default=",".join(IMPLS), help="comma-separated subset of: " + ", ".join(IMPLS))
    p.add_argument("--threads", type=int, default=2, help="torch and osengine threads (default 2)")
    p.add_argument("--device", default="cpu", help="only 'cpu' for now")
    p.add_argument("--backend", default="auto", help="osengine CPU backend: auto, avx2, reference")
    p.add_argument("--min-time", type=float, default=0.2, help="minimum measured seconds per point (default 0.2)")
    p.add_argument("--repeats", type=int, default=5, help="minimum samples per point (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON list of records instead of the table")
    args = p.parse_args(argv)
    if args.device != "cpu":
        p.error(f"--device {args.device!r}: only 'cpu' is supported (the CUDA backend's benchmark is not there yet)")
    args.shapes = SHAPES["smollm2"] + SHAPES["llama7b"] if args.shapes == "all" else SHAPES[args.shapes]
    try:
        args.m = [int(v) for v in args.m.split(",") if v.strip()]
    except ValueError:
        p.error(f"--m {args.m!r}: expected comma-separated integers")
    if not args.m or min(args.m) < 1:
        p.error("--m: token counts must be >= 1")
    args.impl = [v.strip() for v in args.impl.split(",") if v.strip()]
    bad = [v for v in args.impl if v not in IMPLS]
    if bad or not args.impl:
        p.error(f"--impl: unknown {bad}; choose from {', '.join(IMPLS)}")
    args.impl = [i for i in IMPLS if i in args.impl]  # canonical column order
    if args.threads < 1 or args.repeats < 1 or args.min_time < 0:
        p.error("--threads and --repeats must be >= 1, --min-time >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    osengine.set_num_threads(args.threads)
    torch.backends.quantized.engine = "fbgemm"
    backend = args.backend_name = osengine.best_cpu_backend() if args.backend == "auto" else args.backend
    print(f"{device_name(args.threads)}; osengine {osengine.__version__} backend {backend}; torch {torch.__version__}",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    records = run(args)
    if args.json:
        print(json.dumps(records, indent=1))
        return
    print(f"{records[0]['device']}; osengine backend {backend}; torch {torch.__version__}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(table(records, args.impl))
    print()
    print("\n".join(targets(records)))


if __name__ == "__main__":
    main()
