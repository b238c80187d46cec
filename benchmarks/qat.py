"""Learning curve of quantization-aware training (osengine train-qat) on a real model (not a CI test).

Trains once along one `--steps`-step schedule; at each of `--points` (steps done) the training state is kept and the
model of that point is quantized (weights round to nearest or GPTQ, the learned ranges for static inputs) and scored:
WikiText-2 test perplexity, 16 windows of 512 tokens, as benchmarks/accuracy.py. Point 0 is the same post-training
quantization of the untrained model (strategy minmax, no QAT). Training text: WikiText-2 validation (never test).

    python benchmarks/qat.py --steps 300 --points 0 50 100 200 300            # markdown table
    python benchmarks/qat.py --steps 300 --points 300 --json                    # one JSON object per point
    python benchmarks/qat.py --strategy rotate --steps 200 --points 0 100 200 --gptq-after

--strategy rotate trains the rotated model (QuaRot's rotation, then QAT; point 0 is then the rotated model quantized
without training). --gptq-after also quantizes the model of the last point with GPTQ (an extra row; the
training state is kept for it and removed after).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OSENGINE_DATA", ROOT.parent / "shared" / "data"))
WIKI_TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"
WIKI_TRAIN = DATA / "wikitext-2" / "valid.txt"


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w4a4-token")
    p.add_argument("--keep-fp", nargs="*", default=[], help="layers kept in floating point (default: none)")
    p.add_argument("--data", default=str(WIKI_TRAIN), help="training text (default: WikiText-2 validation)")
    p.add_argument("--steps", type=int, default=300, help="length of the schedule")
    p.add_argument("--points", type=int, nargs="+", default=[0, 50, 100, 200, 300], help="steps at which to score")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--kurtosis-weight", type=float, default=1e-7)
    p.add_argument("--weight-rounding", choices=["nearest", "gptq"], default=None)
    p.add_argument("--strategy", default=None, help="transform applied before training (e.g. rotate)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="option of --strategy")
    p.add_argument("--gptq-after", action="store_true",
                   help="also quantize the last point's trained model with GPTQ (an extra row)")
    p.add_argument("--work-dir", default="qat-curve", help="folders of each point and the training state")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    points = sorted(set(args.points))
    if any(not 0 <= k <= args.steps for k in points):
        raise SystemExit(f"--points must lie in [0, --steps={args.steps}], got {points}")

    import torch

    from osengine import api
    from osengine.cli.main import parse_options
    from osengine.evaluation import perplexity

    options = parse_options(args.option)
    if options and not args.strategy:
        raise SystemExit("--option needs --strategy")
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state = work / "state"
    _, tok = api.load_model(args.model)
    runs = [(k, args.weight_rounding) for k in points]
    if args.gptq_after:
        runs.append((points[-1], "gptq"))
    rows, trained_before = [], False
    for i, (k, rounding) in enumerate(runs):
        t0 = time.time()
        out = work / f"step-{k}-{rounding or 'recipe'}"
        if k == 0:
            model, _ = api.load_model(args.model)
            api.quantize(model, recipe=args.recipe, strategy=args.strategy or "minmax", strategy_options=options,
                         calibration=args.data, tokenizer=tok, keep_fp=args.keep_fp, weight_rounding=rounding,
                         n_samples=16, seq_len=args.seq_len, progress=False, out=out, overwrite=True, prefix="none")
            training = {"steps_done": 0, "history": []}
        else:
            model = api.train_qat(args.model, args.data, recipe=args.recipe, out=out, steps=args.steps,
                                  batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                  kurtosis_weight=args.kurtosis_weight, keep_fp=args.keep_fp,
                                  weight_rounding=rounding, state_dir=state, resume=trained_before,
                                  strategy=args.strategy, strategy_options=options or None,
                                  keep_state=i + 1 < len(runs),
                                  stop_after=None if k == args.steps else k, overwrite=True, progress=not args.json)
            trained_before = True
            training = model.osengine_report["training"]
        ppl = perplexity(model, tok, WIKI_TEST, seq_len=512, windows=16, progress=False)["perplexity"]
        history = training["history"]
        recent = history[-10:]
        row = {"model": args.model, "recipe": args.recipe, "strategy": args.strategy, "strategy_options": options,
               "keep_fp": args.keep_fp, "steps": k,
               "schedule": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
               "kurtosis_weight": args.kurtosis_weight, "weight_rounding": rounding or "recipe",
               "perplexity": round(ppl, 3),
               "train_cross_entropy_last10": round(sum(h["cross_entropy"] for h in recent) / len(recent), 4)
               if recent else None,
               "training_seconds_total": round(sum(h["seconds"] for h in history), 1),
               "wall_seconds": round(time.time() - t0, 1), "peak_rss_mib": round(_peak_mib(), 0)}
        rows.append(row)
        print(json.dumps(row) if args.json else f"{row}", file=sys.stdout if args.json else sys.stderr, flush=True)
        del model
    if args.json:
        print(json.dumps({"results": rows}))
        return
    print("| steps | weights | perplexity | train CE (last 10 steps) | training s (total) | peak RSS MiB |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['steps']} | {r['weight_rounding']} | {r['perplexity']} | {r['train_cross_entropy_last10']} | "
              f"{r['training_seconds_total']} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
