"""The commands on the native runtime (C++, osengine.runtime.native): `osengine run` (stream a continuation),
`osengine eval --runtime` (perplexity) and `osengine check --runtime` (the runtime against the integer-exact
simulation). main.py declares the options and sends --runtime here."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


class CommandError(ValueError):
    """A problem the user can fix (printed as `osengine CMD: error: ...`, exit status 2)."""


def require_runtime(command: str) -> None:
    from .. import _C
    from ..runtime.native import BUILD_HINT

    if not _C.has_native_runtime():
        raise CommandError(f"this osengine was built without the native runtime, which {command} needs; {BUILD_HINT}")


def require_folder(path: str, need_tokenizer: bool = True) -> None:
    if not os.path.exists(path):
        raise CommandError(f"{path!r} does not exist (give a quantized folder, the --out of osengine quantize)")
    if not os.path.isdir(path):
        raise CommandError(f"{path!r} is not a folder (give a quantized folder, the --out of osengine quantize)")
    if need_tokenizer and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise CommandError(f"{path!r} has no tokenizer.json: the native runtime reads text through a Hugging Face "
                           f"fast tokenizer's tokenizer.json (quantize saves it when the model has one)")


def load_options(args) -> dict:
    """Keywords for load_native from the command line."""
    return {"quantize_embeddings": bool(getattr(args, "quantize_embeddings", False))}


def cmd_run(args) -> int:
    from ..runtime.native import generate_with_stats, load_native

    require_runtime("run")
    require_folder(args.model)
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model = load_native(args.model, **load_options(args))
    out = sys.stdout

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    g = generate_with_stats(model, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, on_text=write, n_ctx=args.n_ctx,
                            n_threads=args.threads or 0)
    out.write("\n")
    out.flush()
    rate = g.decode_tokens_per_second
    print(f"prompt tokens {len(g.prompt_tokens)}, new tokens {len(g.new_tokens)}, prefill "
          f"{g.prefill_seconds * 1e3:.1f} ms, decode {'n/a' if math.isnan(rate) else f'{rate:.1f}'} tok/s",
          file=sys.stderr)
    return 0


def eval_runtime(args) -> int:
    from ..runtime.native import load_native, perplexity

    if args.engine:
        raise CommandError("eval: give --engine or --runtime, not both")
    if args.lm_eval:
        raise CommandError("eval --runtime computes perplexity only (--ppl FILE); run --lm-eval without --runtime")
    if not args.ppl:
        raise CommandError("eval --runtime needs --ppl TEXTFILE")
    if args.ppl == "generated":
        raise CommandError("eval --runtime needs a text file for --ppl ('generated' text is written by the "
                           "floating-point model in Python; use eval --engine for it)")
    require_runtime("eval --runtime")
    require_folder(args.model)
    if not os.path.isfile(args.ppl):
        raise CommandError(f"--ppl file {args.ppl!r} does not exist")
    # read as osengine.evaluation.perplexity reads it, so that the numbers compare with eval and eval --engine: the
    # bytes decoded as they are (no newline translation: a CRLF file keeps its \r), non-UTF-8 refused
    raw = Path(args.ppl).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CommandError(f"--ppl file {args.ppl!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                           f"{e.start}); convert it to UTF-8 first") from None
    model = load_native(args.model, **load_options(args))
    progress = None
    if not args.json:
        def progress(i, n):
            print(f"\rperplexity: window {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)
    result = {"model": args.model, **perplexity(model, text, seq_len=args.seq_len, max_windows=args.windows,
                                                n_threads=args.threads or 0, on_window=progress),
              "text": args.ppl, "engine": False, "runtime": True}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.3f} ({result['windows']} windows x {result['seq_len']} "
              f"tokens of {result['text']}, native runtime)")
    return 0


def check_runtime(args) -> int:
    from ..api import verify_native

    require_runtime("check --runtime")
    require_folder(args.model)
    if args.backend != "auto":
        raise CommandError("check --runtime: --backend chooses the Python engine's kernels; the native runtime has "
                           "its own")
    new_tokens = 64 if args.new_tokens is None else args.new_tokens
    result = {"model": args.model, **verify_native(args.model, prompt=args.prompt, new_tokens=new_tokens,
                                                   n_threads=args.threads or 0)}
    same = result["tokens_identical"] and result["logits_finite"]
    n = len(result["simulation_tokens"])
    logits = (f"logits over {result['positions']} positions: relative difference max "
              f"{result['logits_max_rel_diff']:.2g}, median {result['logits_median_rel_diff']:.2g}")
    if result["logits_first_above_1e-3"] is not None:
        logits += f" (above 1e-3 from position {result['logits_first_above_1e-3']} on)"
    if args.json:
        print(json.dumps(result))
    elif same:
        stop = "" if n == new_tokens else f" (both stopped at the end-of-sequence token after {n})"
        print(f"{args.model}: the native runtime and the integer-exact simulation agree: identical {n} greedy "
              f"tokens{stop}; {logits}")
    elif not result["logits_finite"]:
        print(f"{args.model}: the native runtime's logits are NOT finite (NaN or inf); {logits}")
    else:
        first = result["first_token_difference"]
        where = f"greedy tokens DIFFER from new token {first} (of {n})"
        if "runtime_token" in result:
            where += (f": the runtime chose {result['runtime_token']}, the simulation {result['simulation_token']}; "
                      f"the simulation's logit gap between the two is {result['simulation_gap']:.3g}, the "
                      f"runtime's {result['runtime_gap']:.3g}")
        print(f"{args.model}: the native runtime and the integer-exact simulation {where}; {logits}")
    return 0 if same else 1
