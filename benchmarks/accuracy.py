"""Accuracy of the quantization front end on real models (not a CI test).

SmolLM2-135M (LLaMA architecture): WikiText-2 perplexity, 16 non-overlapping windows of 512 tokens of
../shared/data/wikitext-2-raw/wiki.test.raw, calibrated on WikiText-2 validation text (never on the test split).
all-MiniLM-L6-v2 (BERT): SST-2 dev accuracy of a logistic-regression probe trained on FP mean-pooled embeddings.

Every configuration runs in its own process, so its calibration time and peak memory (max RSS) are its own.

    python benchmarks/accuracy.py                         # the default table (markdown)
    python benchmarks/accuracy.py --json                  # one JSON object per configuration, then a summary
    python benchmarks/accuracy.py --configs osplus:w8a8-static minmax:w4a4-token:down_proj --no-sst2
    python benchmarks/accuracy.py --configs osplus:w6a6-token+gptq --no-sst2   # weights rounded by GPTQ
    python benchmarks/accuracy.py --configs fp+prefix osplus:w8a8-static+prefix --no-sst2
        # +prefix: behind the outlier-token prefix detected on the calibration data (PrefixQuant; fp: the FP model
        # reading that prefix in front of every window); without it, the recipe's field prefix decides
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OSENGINE_DATA", ROOT.parent / "shared" / "data"))
WIKI_TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"
WIKI_CALIB = DATA / "wikitext-2" / "valid.txt"
SST2 = DATA / "sst-2"

# strategy:preset[:keep_fp layer] — the targets of issue 3 need these; add more with --configs
DEFAULT_LM = [
    "fp", "minmax:w8a8-static", "osplus:w8a8-static", "osplus+shift=runtime:w8a8-static",
    "minmax:w6a6-token", "smoothquant:w6a6-token", "osplus:w6a6-token",
    # beyond the paper: a runtime shift from quantile extremes on the norm outputs, and GPTQ weight rounding
    "osplus+shift=runtime+shift_quantile=0.001+shift_sites=attn,mlp:w6a6-token+gptq",
    "minmax:w4a4-token:down_proj", "smoothquant:w4a4-token:down_proj", "osplus:w4a4-token:down_proj",
]
DEFAULT_SST2 = ["fp", "minmax:w8a8-static", "osplus:w8a8-static", "minmax:w6a6", "osplus:w6a6"]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _parse(config: str):
    """fp[+prefix] | strategy[+strategy][+key=value...]:preset[+gptq|+nearest][+prefix][:keep_fp,...] ->
    (strategy, preset, keep_fp, options, rounding, prefix)"""
    import yaml

    parts = config.split(":")
    if parts[0] in ("fp", "fp+prefix"):
        return "fp", None, [], {}, None, parts[0] == "fp+prefix"
    if len(parts) < 2:
        raise SystemExit(f"--configs entry {config!r} must be fp[+prefix] or "
                         "strategy[+key=value]:preset[+gptq][+prefix][:keep_fp,...]")
    segments = parts[0].split("+")   # strategy names (rotate+osplus composes them), then key=value options
    strategy = "+".join(s for s in segments if "=" not in s)
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in segments if "=" in o)}
    preset, *suffixes = parts[1].split("+")
    unknown = [x for x in suffixes if x not in ("gptq", "nearest", "prefix")]
    if unknown:
        raise SystemExit(f"--configs entry {config!r}: a preset may end in +gptq or +nearest (weight rounding) and "
                         f"+prefix, got +{unknown[0]}")
    rounding = next((x for x in suffixes if x != "prefix"), None)
    return strategy, preset, parts[2].split(",") if len(parts) > 2 else [], options, rounding, "prefix" in suffixes


def run_lm(config: str, args) -> dict:
    import torch

    from osengine import api
    from osengine.evaluation import perplexity, perplexity_on_windows

    torch.set_num_threads(args.threads)
    strategy, preset, keep, options, rounding, prefix = _parse(config)
    model, tok = api.load_model(args.model)
    result = {"model": args.model, "config": config, "strategy": strategy, "recipe": preset,
              "weight_rounding": rounding or "recipe", "keep_fp": keep, "options": options, "prefix": [],
              "calibration_seconds": 0.0}
    fp_prefix = None
    if strategy == "fp" and prefix:   # the prefix quantize(prefix="auto") would choose on the same data
        fp_prefix = api.find_outlier_tokens(model, args.calib, tokenizer=tok, n_samples=args.samples, seq_len=512,
                                            batch_size=args.batch_size, progress=False)["prefix"]
        result["prefix"] = fp_prefix
    if strategy != "fp":
        options = {"max_grid_steps": args.grid, **options} if "osplus" in strategy.split("+") else options
        api.quantize(model, recipe=preset, strategy=strategy, calibration=args.calib, tokenizer=tok, keep_fp=keep,
                     weight_rounding=rounding, n_samples=args.samples, seq_len=512, batch_size=args.batch_size,
                     strategy_options=options, progress=False, prefix="auto" if prefix else None)
        result["calibration_seconds"] = round(model.osengine_report["calibration_seconds"], 1)
        result["prefix"] = list(model.osengine_prefix)
    ppl = perplexity(model, tok, WIKI_TEST, seq_len=512, windows=16, progress=False, prefix=fp_prefix)
    other = perplexity_on_windows(model, _other_corpus_windows(tok), progress=False, prefix=fp_prefix)
    result.update(perplexity=round(ppl["perplexity"], 3), perplexity_sst2=round(other["perplexity"], 3),
                  peak_rss_mib=round(_peak_mib(), 0))
    return result


def _other_corpus_windows(tokenizer, windows: int = 16, seq_len: int = 512):
    """Text unlike the WikiText calibration data: the SST-2 dev sentences (movie reviews), one per line, in 16
    windows of 512 tokens."""
    ids = tokenizer("\n".join(_sst2("dev", 10_000)[0]), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = min(windows, ids.numel() // seq_len)
    return ids[: n * seq_len].reshape(n, seq_len)


def _sst2(split: str, limit: int):
    rows = (SST2 / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
    pairs = [r.rsplit("\t", 1) for r in rows if "\t" in r]
    return [s for s, _ in pairs][:limit], [int(y) for _, y in pairs][:limit]


def run_sst2(config: str, args) -> dict:
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from osengine import api
    from osengine.evaluation import sentence_embeddings

    torch.set_num_threads(args.threads)
    strategy, preset, keep, options, rounding, _ = _parse(config)   # encoders take no prefix
    model, tok = api.load_model("minilm-l6")
    train_x, train_y = _sst2("train", args.sst2_train)
    dev_x, dev_y = _sst2("dev", 10_000)
    # the probe is trained once, on FP embeddings; quantized encoders are only evaluated through it
    probe_train = torch.tensor(np.asarray(sentence_embeddings(model, tok, train_x, progress=False)))
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(probe_train.numpy(), train_y)
    result = {"model": "minilm-l6", "config": config, "strategy": strategy, "recipe": preset,
              "weight_rounding": rounding or "recipe", "keep_fp": keep, "options": options, "calibration_seconds": 0.0}
    if strategy != "fp":
        # calibration: SST-2 training sentences that the probe did not use, one padded sample each ([CLS] ... [SEP],
        # as the encoder sees them at inference; padding is left out of every calibration statistic)
        calib_text = _sst2("train", args.sst2_train + 2000)[0][args.sst2_train:]
        options = {"max_grid_steps": args.grid, **options} if "osplus" in strategy.split("+") else options
        api.quantize(model, recipe=preset, strategy=strategy, calibration=calib_text, tokenizer=tok, keep_fp=keep,
                     weight_rounding=rounding, n_samples=args.sst2_samples, seq_len=128, batch_size=args.sst2_batch,
                     strategy_options=options, progress=False)
        result["calibration_seconds"] = round(model.osengine_report["calibration_seconds"], 1)
    dev = sentence_embeddings(model, tok, dev_x, progress=False).numpy()
    result.update(sst2_accuracy=round(100.0 * float((probe.predict(dev) == np.asarray(dev_y)).mean()), 2),
                  peak_rss_mib=round(_peak_mib(), 0))
    return result


def _child(kind: str, config: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, config, "--threads", str(args.threads), "--samples",
           str(args.samples), "--calib", str(args.calib), "--grid", str(args.grid), "--batch-size",
           str(args.batch_size), "--sst2-batch", str(args.sst2_batch), "--sst2-samples", str(args.sst2_samples),
           "--sst2-train", str(args.sst2_train), "--model", args.model]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"config": config, "kind": kind, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list) -> str:
    lines = ["| model | strategy | recipe | kept in FP | prefix | metric | value | calibration s | peak RSS MiB |",
             "|---|---|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| | {r['config']} | | | | error | {r['error']} | | |")
            continue
        metric = "perplexity" if "perplexity" in r else "sst2_accuracy"
        value = f"{r[metric]} (SST-2 text {r['perplexity_sst2']})" if "perplexity_sst2" in r else r[metric]
        opts = "".join(f" {k}={v}" for k, v in r.get("options", {}).items())
        rounding = r.get("weight_rounding", "recipe")
        recipe = (r["recipe"] or "-") + ("" if rounding == "recipe" else f" +{rounding}")
        prefix = r.get("prefix") or "-"
        lines.append(f"| {r['model']} | {r['strategy']}{opts} | {recipe} | {','.join(r['keep_fp']) or '-'} "
                     f"| {prefix} | {metric} | {value} | {r['calibration_seconds']} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--configs", nargs="+", default=DEFAULT_LM, help="fp | strategy:preset[:keep_fp,...]")
    p.add_argument("--sst2-configs", nargs="+", default=DEFAULT_SST2)
    p.add_argument("--no-sst2", action="store_true")
    p.add_argument("--no-lm", action="store_true")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default=str(WIKI_CALIB), help="calibration text (default: WikiText-2 validation)")
    p.add_argument("--samples", type=int, default=16, help="calibration samples of 512 tokens")
    p.add_argument("--batch-size", type=int, default=2, help="calibration batch; OS+ scores its grid on the first")
    p.add_argument("--grid", type=int, default=50, help="OS+ max_grid_steps (coarse and fine grids)")
    p.add_argument("--sst2-samples", type=int, default=128, help="SST-2 calibration sentences")
    p.add_argument("--sst2-batch", type=int, default=32,
                   help="SST-2 calibration batch (sentences); OS+ scores its grid on the first")
    p.add_argument("--sst2-train", type=int, default=4000, help="SST-2 training sentences for the probe")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, config = args.child
        print(json.dumps(run_lm(config, args) if kind == "lm" else run_sst2(config, args)))
        return
    jobs = ([] if args.no_lm else [("lm", c) for c in args.configs]) + \
           ([] if args.no_sst2 else [("sst2", c) for c in args.sst2_configs])
    rows = []
    for kind, config in jobs:
        t0 = time.time()
        row = _child(kind, config, args)
        row["wall_seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{kind} {config}: {row}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"results": rows}))
    else:
        print(markdown(rows))


if __name__ == "__main__":
    main()
