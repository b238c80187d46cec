"""Command line: osengine quantize | train-qat | outliers | eval | check | run | export | upgrade | bench | plugins |
recipes."""
from __future__ import annotations

import argparse
import json
import sys

import yaml


def parse_options(pairs):
    """--option key=value (values parsed as YAML scalars: 0.8 -> float, runtime -> str, true -> bool)."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ValueError(f"--option {p!r} must look like key=value")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _prefix_arg(value):
    """--prefix auto | none | ID,ID,..."""
    if value in (None, "none", "auto"):
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(f"--prefix must be auto, none or comma-separated token ids, got {value!r}") from None


def cmd_quantize(args) -> int:
    import torch

    from ..api import quantize
    from ..calibrate.report import markdown_table, write_report

    torch.set_num_threads(args.threads) if args.threads else None
    model = quantize(args.model, recipe=args.recipe, strategy=args.strategy, calibration=args.calib,
                     keep_fp=args.keep_fp or (), strategy_options=parse_options(args.option),
                     weight_rounding=args.weight_rounding, n_samples=args.samples,
                     seq_len=args.seq_len, batch_size=args.batch_size, search_batches=args.search_batches,
                     device=args.device, out=args.out, overwrite=args.overwrite, progress=not args.json,
                     prefix=_prefix_arg(args.prefix), resume=args.resume, max_memory=args.max_memory)
    report = model.osengine_report
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return 0   # torchrun: every process holds the same model; rank 0 reports
    files = write_report(report, args.report or args.out, args.plot_sites) if (args.report or args.out) else {}
    summary = {"model": args.model, "recipe": report["recipe"]["name"], "strategy": report["strategy"],
               "architecture": report["architecture"], "out": args.out,
               "calibration_seconds": round(report["calibration_seconds"], 2), "prefix": report.get("prefix", []),
               "processes": report["processes"],
               "peak_rss_mib": round(report["peak_rss_mib"], 1), **files}
    rotation = report.get("model_transforms", {}).get("rotation")
    if rotation:   # what changed outside the recipe's layers: say so
        summary["rotation"] = (f"hadamard seed {rotation['seed']}, {len(rotation['online'])} linears rotated online"
                               + (", lm_head untied from the embeddings" if rotation["lm_head_untied"] else "")
                               + (", LayerNorms replaced by RMSNorms" if rotation["layernorms_replaced"] else ""))
    if args.json:
        print(json.dumps(summary))
    else:
        print(markdown_table(report))
        print("\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def cmd_train_qat(args) -> int:
    import torch

    from ..api import train_qat
    from ..calibrate.report import write_report

    torch.set_num_threads(args.threads) if args.threads else None
    model = train_qat(args.model, args.data, recipe=args.recipe, out=args.out, steps=args.steps,
                      batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, range_lr=args.range_lr,
                      kurtosis_weight=args.kurtosis_weight, warmup_steps=args.warmup, save_every=args.save_every,
                      seed=args.seed, keep_fp=args.keep_fp or (), weight_rounding=args.weight_rounding,
                      resume=args.resume, state_dir=args.state, stop_after=args.stop_after,
                      strategy=args.strategy, strategy_options=parse_options(args.option),
                      keep_state=args.keep_state, device=args.device, overwrite=args.overwrite,
                      progress=not args.json)
    report = model.osengine_report
    training = report["training"]
    history = training["history"]
    files = write_report(report, args.out)
    summary = {"model": args.model, "recipe": report["recipe"]["name"], "out": args.out,
               "steps_done": training["steps_done"], "steps": training["steps"], "finished": training["finished"],
               "first_cross_entropy": round(history[0]["cross_entropy"], 4) if history else None,
               "last_cross_entropy": round(history[-1]["cross_entropy"], 4) if history else None,
               "training_seconds_this_run": training["training_seconds_this_run"],
               "peak_rss_mib": round(report["peak_rss_mib"], 1), **files}
    print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def cmd_outliers(args) -> int:
    import torch

    from ..api import find_outlier_tokens
    from ..calibrate.prefix import plot_outlier_ratios

    torch.set_num_threads(args.threads) if args.threads else None
    found = find_outlier_tokens(args.model, args.calib, n_samples=args.samples, seq_len=args.seq_len,
                                threshold=args.threshold, max_prefix=args.max_prefix, batch_size=args.batch_size,
                                device=args.device, progress=not args.json)
    reports = found["reports"]
    if args.plot:
        labels = ["no prefix"] + [f"prefix {found['prefix_tokens'][:len(r.prefix)]}" for r in reports[1:]]
        plot_outlier_ratios(reports, args.plot, labels)
    if args.json:
        print(json.dumps({"prefix": found["prefix"], "prefix_tokens": found["prefix_tokens"],
                          "samples": found["samples"], "seq_len": found["seq_len"],
                          "measurements": [r.to_dict() for r in reports]}))
        return 0
    print(f"{found['samples']} samples x {found['seq_len']} tokens; outlier: a token whose max |x| over a linear "
          f"input's channels exceeds {args.threshold:g}x the median token's")
    print("\n| prefix | worst ratio | worst block | outlier occurrences | first-position samples |")
    print("|---|---:|---:|---:|---:|")
    for r in reports:
        worst = r.block_worst()
        block = max(range(len(worst)), key=worst.__getitem__) if worst else "-"
        print(f"| {r.prefix or 'none'} | {r.worst_ratio():.1f} | {block} | {sum(r.counts().values())} | "
              f"{r.first_position_samples()} |")
    if found["prefix"]:
        print(f"\nprefix: {found['prefix']} = {found['prefix_tokens']}")
    else:
        print("\nno outlier tokens that a prefix would take: no prefix")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def cmd_eval(args) -> int:
    if args.runtime:
        from .native_runtime import eval_runtime

        return eval_runtime(args)
    if args.quantize_embeddings:
        raise ValueError("--quantize-embeddings applies to eval --runtime")
    import torch

    from ..api import evaluate, load_model
    from ..evaluation import run_lm_eval

    torch.set_num_threads(args.threads) if args.threads else None
    if not args.ppl and not args.lm_eval:
        raise ValueError("eval needs --ppl TEXTFILE (or 'generated') and/or --lm-eval TASKS")
    result = {"model": args.model}
    if args.ppl:
        result.update(evaluate(args.model, args.ppl, seq_len=args.seq_len, windows=args.windows,
                               device=args.device, engine=args.engine, progress=not args.json))
        result["engine"] = bool(args.engine)
    if args.lm_eval:
        model, tokenizer = load_model(args.model, device=args.device or "cpu")
        result["lm_eval"] = run_lm_eval(model, tokenizer, args.lm_eval.split(","), limit=args.limit)
    if args.json:
        print(json.dumps(result))
    else:
        if "perplexity" in result:
            print(f"perplexity {result['perplexity']:.3f} ({result['windows']} windows x {result['seq_len']} "
                  f"tokens of {result['text']})")
        for task, metrics in result.get("lm_eval", {}).items():
            print(task, metrics)
    return 0


def cmd_check(args) -> int:
    import torch

    from ..api import verify_engine

    torch.set_num_threads(args.threads) if args.threads else None
    if args.runtime:
        from .native_runtime import check_runtime

        return check_runtime(args)
    args.new_tokens = 32 if args.new_tokens is None else args.new_tokens
    result = {"model": args.model, **verify_engine(args.model, prompt=args.prompt, new_tokens=args.new_tokens,
                                                   backend=args.backend)}
    same = result["logits_identical"] and result["tokens_identical"]
    if args.json:
        print(json.dumps(result))
    elif same:
        print(f"{args.model}: the engine ({args.backend}) and the integer-exact simulation agree bit for bit: "
              f"identical logits at {result['positions']} positions, identical {args.new_tokens} greedy tokens")
    else:
        first = result["first_token_difference"]
        print(f"{args.model}: the engine ({args.backend}) and the integer-exact simulation DIFFER: logits max abs "
              f"difference {result['logits_max_abs_diff']:.3g}; greedy tokens "
              f"{'identical' if first is None else f'differ from new token {first}'}")
    return 0 if same else 1


def cmd_run(args) -> int:
    from .native_runtime import cmd_run as run

    return run(args)


def cmd_export(args) -> int:
    import torch

    from ..io.export import export

    torch.set_num_threads(args.threads) if args.threads else None
    summary = export(args.model, args.format, args.out, overwrite=args.overwrite, weights_only=args.weights_only)
    if args.json:
        print(json.dumps(summary))
    else:
        w, a = summary["weights"], summary["input_activations"]
        grouping = f"groups of {w['group_size']}" if w["strategy"] == "group" else w["strategy"]
        activations = "activations in floating point" if a is None else (
            f"activations {'dynamic per token' if a['dynamic'] else 'static per tensor'} "
            f"{'symmetric' if a['symmetric'] else 'asymmetric'}")
        print(f"{summary['out']}: {summary['format']} {summary['scheme']} ({summary['compression']}), "
              f"{summary['quantized_linears']} int{w['num_bits']} linears (weights per {grouping}, {activations}), "
              f"{summary['ignored_linears']} kept in floating point; tensor-parallel sizes "
              f"{', '.join(map(str, summary['tensor_parallel_sizes'])) or 'none'}")
    return 0


def cmd_upgrade(args) -> int:
    from ..io.checkpoint import FORMAT_VERSION
    from ..io.quantized_model import upgrade_quantized

    out = upgrade_quantized(args.model, args.out, overwrite=args.overwrite)
    print(f"{out}: format version {FORMAT_VERSION}")
    return 0


def cmd_bench(args) -> int:
    from .bench import main

    return main(args)


def cmd_compare(args) -> int:
    from .compare import main

    return main(args)


def cmd_plugins(args) -> int:
    from ..plugins.registry import architectures, strategies

    rows, errors = [], []
    for reg in (strategies, architectures):
        for info in sorted(reg.infos(), key=lambda i: i.name):
            extra = ", ".join(info.obj.model_types) if reg is architectures else ""
            rows.append({"kind": reg.kind, "name": info.name, "source": info.source,
                         "description": info.obj.description + (f" [model types: {extra}]" if extra else "")})
        errors += [{"kind": reg.kind, "name": n, "source": s, "traceback": tb} for n, s, tb in reg.errors]
    if args.json:
        print(json.dumps({"plugins": rows, "broken": errors}))
        return 0
    for r in rows:
        print(f"{r['kind']:<13} {r['name']:<14} {r['source']}\n{'':<28} {r['description']}")
    for e in errors:
        print(f"BROKEN {e['kind']} {e['name']} from {e['source']}:\n{e['traceback']}")
    return 0


def cmd_recipes(args) -> int:
    from ..quant.recipes import load_recipe, preset_names

    for name in preset_names():
        r = load_recipe(name)
        w, a = r.weights, r.activations
        print(f"{name:<20} weights {w.bits}b {'sym' if w.symmetric else 'asym'} {w.granularity}"
              f"{'/' + str(w.group_size) if w.group_size else ''}{' gptq' if w.rounding == 'gptq' else ''}; "
              f"activations {a.bits}b "
              f"{'sym' if a.symmetric else 'asym'}{' full-range' if a.full_range else ''} "
              f"{a.granularity}{'/' + str(a.group_size) if a.group_size else ''} "
              f"{'dynamic' if a.dynamic else 'static ' + a.observer}; bmm {'on' if r.bmm_inputs else 'off'}"
              f"{'' if r.prefix == 'none' else '; prefix ' + str(r.prefix)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osengine", description="Outlier Suppression+ quantization of transformer LMs")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate and fake-quantize a model; save it with --out")
    q.add_argument("model", help="Hugging Face folder, .gguf file, or registered name (smollm2-135m, minilm-l6)")
    q.add_argument("--recipe", default="w8a8-static", help="preset name (osengine recipes) or YAML file")
    q.add_argument("--strategy", default="osplus", help="calibration strategy (osengine plugins); "
                   "compose a rotation with another: rotate+osplus")
    q.add_argument("--calib", default="generated", help="calibration text file, or 'generated' (default)")
    q.add_argument("--out", help="checkpoint folder (model.safetensors, osengine.json, config, tokenizer) plus "
                                 "report.md and activation_ranges.png")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last finished block (the progress saved in "
                        "OUT.progress); same arguments, same result as an uninterrupted run")
    q.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="calibrate a model larger than memory block by block from its safetensors files within SIZE "
                        "(e.g. 1.5GiB); fails early when the estimate does not fit")
    q.add_argument("--keep-fp", nargs="+", metavar="LAYER", help="layers kept in floating point, e.g. down_proj")
    q.add_argument("--weight-rounding", choices=["nearest", "gptq"], default=None,
                   help="override the recipe's weights.rounding: gptq rounds weights by GPTQ on the calibration data")
    q.add_argument("--option", action="append", metavar="KEY=VALUE", help="strategy option, e.g. alpha=0.8")
    q.add_argument("--samples", type=int, default=16, help="calibration samples (default 16)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--search-batches", type=int, default=1, help="batches on which OS+ scores its t grid")
    q.add_argument("--prefix", default=None, metavar="auto|none|IDS",
                   help="full-precision prefix of outlier tokens in front of every sequence: auto (detected on the "
                        "calibration data, see osengine outliers), none, or comma-separated token ids (default: the "
                        "recipe's field prefix, none in the presets)")
    q.add_argument("--device", default=None, help="cpu (default) or cuda")
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--report", help="folder for the report (default: --out)")
    q.add_argument("--plot-sites", nargs="+", metavar="BLOCK.SITE", help="sites to plot, e.g. 11.down 3.attn")
    q.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("train-qat", help="quantization-aware training (learned input ranges + kurtosis penalty), "
                                         "then weight quantization; writes a quantized folder")
    t.add_argument("model", help="floating-point model: Hugging Face folder, .gguf file, or registered name")
    t.add_argument("--data", required=True, help="UTF-8 training text file (cut into --seq-len windows)")
    t.add_argument("--out", required=True, help="quantized folder to write")
    t.add_argument("--recipe", default="w4a4-token", help="preset name or YAML file (default w4a4-token)")
    t.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    t.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    t.add_argument("--lr", type=float, default=1e-4, help="weights' learning rate, cosine after warmup")
    t.add_argument("--range-lr", type=float, default=1e-3, help="learning rate of static clipping ranges")
    t.add_argument("--kurtosis-weight", type=float, default=1e-7, help="lambda of the kurtosis term (default 1e-7)")
    t.add_argument("--warmup", type=int, default=10, help="warmup steps (default 10)")
    t.add_argument("--save-every", type=int, default=25, help="steps between saved training states (default 25)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--keep-fp", nargs="+", metavar="LAYER", help="layers kept in floating point")
    t.add_argument("--weight-rounding", choices=["nearest", "gptq"], default=None,
                   help="how the trained weights are quantized (default: the recipe's)")
    t.add_argument("--strategy", default=None,
                   help="a transform applied before training, e.g. rotate (strategies that migrate sites are refused)")
    t.add_argument("--option", action="append", metavar="KEY=VALUE", help="option of --strategy, e.g. seed=1")
    t.add_argument("--keep-state", action="store_true",
                   help="keep the training state after the last step (to quantize the trained model again)")
    t.add_argument("--resume", action="store_true", help="continue the training state of an interrupted run")
    t.add_argument("--state", default=None, help="training state folder (default: OUT.qat-state beside --out)")
    t.add_argument("--stop-after", type=int, default=None,
                   help="train up to this step of the schedule, keep the state, write that point's model")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    t.add_argument("--device", default=None, help="cpu (default) or cuda")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--json", action="store_true", help="print a JSON summary")
    t.set_defaults(func=cmd_train_qat)

    o = sub.add_parser("outliers", help="find the outlier tokens (massive activations) of a floating-point model and "
                                        "the full-precision prefix that takes their role")
    o.add_argument("model", help="Hugging Face folder, .gguf file, or registered name")
    o.add_argument("--calib", default="generated", help="calibration text file, or 'generated' (default)")
    o.add_argument("--samples", type=int, default=8, help="calibration samples (default 8)")
    o.add_argument("--seq-len", type=int, default=256, help="tokens per sample (default 256)")
    o.add_argument("--threshold", type=float, default=64.0, help="outlier ratio to the median token (default 64)")
    o.add_argument("--max-prefix", type=int, default=4, help="longest prefix considered (default 4)")
    o.add_argument("--batch-size", type=int, default=4)
    o.add_argument("--device", default=None, help="cpu (default) or cuda")
    o.add_argument("--threads", type=int, default=None)
    o.add_argument("--plot", metavar="PNG", help="per-block worst ratio without and with the prefix")
    o.add_argument("--json", action="store_true", help="print JSON instead of the table")
    o.set_defaults(func=cmd_outliers)

    e = sub.add_parser("eval", help="perplexity (and optional lm-evaluation-harness tasks)")
    e.add_argument("model", help="a quantized folder (--out of quantize) or anything quantize accepts")
    e.add_argument("--ppl", help="text file for perplexity, or 'generated' (text written by the FP model)")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--windows", type=int, default=16, help="non-overlapping windows (default 16)")
    e.add_argument("--engine", action="store_true",
                   help="run a quantized folder on the engine (real int8 / int4 GEMMs) instead of fake quant")
    e.add_argument("--runtime", action="store_true",
                   help="perplexity of a quantized folder on the native runtime (C++, its tokenizer.json); the same "
                        "windows and conventions as the other paths")
    e.add_argument("--quantize-embeddings", action="store_true",
                   help="--runtime: int8 embedding table and lm_head (where the runtime supports it)")
    e.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval tasks (needs osengine[eval])")
    e.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task")
    e.add_argument("--device", default=None)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--json", action="store_true", help='print {"perplexity": ..., ...}')
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("check", help="run a quantized folder on the engine (or the native runtime) and in the "
                                     "integer-exact simulation and compare them (exit status 1 if they differ)")
    c.add_argument("model", help="a quantized folder (--out of quantize) that the engine runs")
    c.add_argument("--prompt", default="The history of the city begins", help="text to continue")
    c.add_argument("--new-tokens", "--tokens", dest="new_tokens", type=int, default=None,
                   help="greedy tokens generated by both (default 32; 64 with --runtime)")
    c.add_argument("--runtime", action="store_true",
                   help="check the native runtime (C++) instead of the engine: identical greedy tokens, the relative "
                        "logit difference (not bit for bit: its final norm and fp32 lm_head sum in another float "
                        "order)")
    c.add_argument("--backend", default="auto",
                   help="engine CPU backend: auto or a registered one (osengine.registered_backends())")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check)

    rn = sub.add_parser("run", help="continue a prompt on the native runtime (C++), streaming the text")
    rn.add_argument("model", help="a quantized folder (--out of quantize) with its tokenizer.json")
    rn.add_argument("--prompt", required=True, help="text to continue (tokenized with the folder's tokenizer.json)")
    rn.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    rn.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; else sampled")
    rn.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    rn.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    rn.add_argument("--seed", type=int, default=0, help="sampling seed (the same seed, the same text)")
    rn.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    rn.add_argument("--n-ctx", type=int, default=None,
                    help="KV cache positions (default: prompt tokens + --max-new-tokens)")
    rn.add_argument("--quantize-embeddings", action="store_true",
                    help="int8 embedding table and lm_head (where the runtime supports it)")
    rn.set_defaults(func=cmd_run)

    x = sub.add_parser("export", help="write a quantized folder for other runtimes (compressed-tensors: "
                                      "transformers, vLLM)")
    x.add_argument("model", help="a quantized folder (--out of quantize)")
    x.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors"])
    x.add_argument("--out", required=True, help="output folder (written atomically)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    x.add_argument("--weights-only", action="store_true",
                   help="write the quantized weights alone (W4A16 / W8A16): activations stay in floating point")
    x.add_argument("--threads", type=int, default=None)
    x.add_argument("--json", action="store_true", help="print a JSON summary")
    x.set_defaults(func=cmd_export)

    u = sub.add_parser("upgrade", help="rewrite a quantized folder of an older format version in the current one "
                                       "(weights as integer codes, as the native runtime reads them)")
    u.add_argument("model", help="a quantized folder")
    u.add_argument("--out", required=True, help="output folder (written atomically)")
    u.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    u.set_defaults(func=cmd_upgrade)

    pl = sub.add_parser("plugins", help="list strategies and architectures and where they came from")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)

    r = sub.add_parser("recipes", help="list the preset recipes")
    r.set_defaults(func=cmd_recipes)

    from .bench import add_arguments as bench_arguments

    b = sub.add_parser("bench", help="end-to-end prefill and decode speed and memory: float model vs the engine")
    bench_arguments(b)
    b.set_defaults(func=cmd_bench)

    from .compare import add_arguments as compare_arguments

    cp = sub.add_parser("compare", help="a quantized folder side by side with its FP base model: perplexity, "
                                        "speed, size and a generated sample")
    compare_arguments(cp)
    cp.set_defaults(func=cmd_compare)
    return p


def _is_user_error(e: RuntimeError) -> bool:
    """PluginError and NativeRuntimeUnavailable, imported only when needed (the first imports torch, which
    `osengine run` does without)."""
    from ..runtime.native import NativeRuntimeUnavailable

    if isinstance(e, NativeRuntimeUnavailable):
        return True
    try:
        from ..plugins.api import PluginError
    except ImportError:  # no torch: then no plugin raised it
        return False
    return isinstance(e, PluginError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # RecipeError, CalibrationError, ModelLoadError, EvaluationError and the runtime's LoadError are ValueErrors
    except (ValueError, FileExistsError) as e:
        error = e
    except RuntimeError as e:
        if not _is_user_error(e):
            raise
        error = e
    print(f"osengine {args.command}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
