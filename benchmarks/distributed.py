"""Calibration on one process against two (torch.distributed, gloo, one thread each) on the same samples: wall time of
each and whether the two folders hold the same model (not a CI test; tests/calibrate/test_distributed.py checks the
equality on tiny models in CI).

Each run is `torchrun --standalone --nproc-per-node N -m osengine.cli quantize ... --threads 1` in a fresh process
group, so the times include loading the model and the calibration text in every process; the runs alternate
(1, 2, 1, 2, ... with --repeats). The folders are compared tensor by tensor: integer codes, activation ranges and every
other tensor must be equal; the table gives the largest difference of any tensor that is not.

    python benchmarks/distributed.py                                   # SmolLM2-135M, w8a8-static, osplus
    python benchmarks/distributed.py --recipe w8a8-token --strategy smoothquant --samples 32 --json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OSENGINE_DATA", ROOT.parent / "shared" / "data"))
WIKI_CALIB = DATA / "wikitext-2" / "valid.txt"


def run(processes: int, out: Path, args) -> float:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "osengine.cli", "quantize", args.model, "--recipe", args.recipe, "--strategy", args.strategy,
               "--calib", str(args.calib), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--search-batches", str(args.search_batches), "--threads", "1",
               "--json", "--out", str(out), "--overwrite"]
    for option in args.option or []:
        command += ["--option", option]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.time() - started


def compare(one: Path, two: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    differing = {k: float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp(min=1e-30))
                 for k in a if k in b and not torch.equal(a[k], b[k])}
    codes = [k for k in a if k.endswith(".weight_codes")]
    return {"tensors": len(a), "same_names": a.keys() == b.keys(), "differing_tensors": len(differing),
            "codes_identical": all(k in b and torch.equal(a[k], b[k]) for k in codes),
            "largest_relative_difference": max(differing.values(), default=0.0),
            "worst_tensor": max(differing, key=differing.get) if differing else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w8a8-static")
    p.add_argument("--strategy", default="osplus")
    p.add_argument("--option", action="append", metavar="KEY=VALUE")
    p.add_argument("--calib", default=str(WIKI_CALIB))
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--search-batches", type=int, default=1, help="batches on which OS+ scores its grid (default 1; "
                   "the search then runs where those batches are: use 2 to give both processes a share)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not Path(args.calib).is_file():
        raise SystemExit(f"{args.calib} is missing (set OSENGINE_DATA to the folder holding wikitext-2)")
    work = Path(tempfile.mkdtemp(prefix="osengine-distributed-"))
    try:
        times = {1: [], 2: []}
        for _ in range(args.repeats):
            for n in (1, 2):
                times[n].append(run(n, work / f"p{n}", args))
        row = {"model": args.model, "recipe": args.recipe, "strategy": args.strategy, "samples": args.samples,
               "seq_len": args.seq_len, "batch_size": args.batch_size, "search_batches": args.search_batches,
               "threads_per_process": 1,
               "seconds_1_process": min(times[1]), "seconds_2_processes": min(times[2]),
               "speedup": min(times[1]) / min(times[2]), **compare(work / "p1", work / "p2")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{args.model}, {args.recipe}, {args.strategy}: {args.samples} x {args.seq_len} tokens, batches of "
              f"{args.batch_size}, {args.search_batches} search batches, one thread per process (best of "
              f"{args.repeats})\n")
        print("| processes | wall s | speedup | same model |")
        print("|---|---|---|---|")
        same = (f"codes identical, {row['differing_tensors']} of {row['tensors']} tensors differ (largest relative "
                f"{row['largest_relative_difference']:.1e})" if row["differing_tensors"] else "identical")
        print(f"| 1 | {row['seconds_1_process']:.1f} | 1.00 | |")
        print(f"| 2 | {row['seconds_2_processes']:.1f} | {row['speedup']:.2f} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
