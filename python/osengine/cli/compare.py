"""osengine compare DIR: a quantized folder side by side with its floating-point base model, in under two minutes.

The FP model (the folder's manifest base_model, fp32, transformers) and the quantized folder (the native runtime,
lm_head in int8 unless --fp-head; the Python engine `osengine.load` when the runtime cannot run it) are measured the
same way on the same token ids:

  perplexity   exp(mean NLL) over --windows windows of --seq-len tokens (--ppl FILE, or "generated": samples the FP
               model writes, batched, the seed of `osengine eval --ppl generated`); one set of ids for both
  decode       greedy tokens/s at batch 1 with a KV cache, one model call per token in a Python loop (the prompt's
               prefill untimed): transformers' past_key_values against the runtime's context
  prefill      ms for one input of up to 512 tokens (the best of two)
  size         MB of FP parameters, of the quantized folder on disk, of the weights as the quantized side holds them
  sample       --new-tokens greedy tokens after --prompt from both (the decode measurement)

then a one-line reading of the numbers. --json prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

PREFILL_TOKENS = 512


class CompareError(ValueError):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a quantized folder (--out of osengine quantize)")
    p.add_argument("--base", default=None, help="the floating-point model to compare with (default: the folder's "
                                                "manifest base_model)")
    p.add_argument("--ppl", default="generated",
                   help="text file for perplexity, or 'generated' (default: text written by the FP model)")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per perplexity window (default 256)")
    p.add_argument("--prompt", default="The capital of France is", help="prompt of the generated sample")
    p.add_argument("--new-tokens", type=int, default=40, help="greedy tokens of the sample, also the decode "
                                                              "measurement (default 40)")
    p.add_argument("--fp-head", action="store_true",
                   help="keep the recipe's fp32 lm_head and embeddings on the quantized side (default: int8, as "
                        "deployments run them: faster decoding at a small accuracy cost)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both sides (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")


# -- the two sides: the same calls on token ids ---------------------------------------------------------------------

class TorchSide:
    """A transformers causal LM (the FP model, or the engine-backed quantized model of the fallback)."""

    def __init__(self, model, label: str, nbytes: int):
        self.model, self.label, self.nbytes = model, label, nbytes

    def logits(self, window: np.ndarray) -> np.ndarray:
        import torch

        from ..calibrate.prefix import run_after_prefix

        with torch.inference_mode():
            ids = torch.from_numpy(np.asarray(window, dtype=np.int64)).unsqueeze(0)
            return run_after_prefix(self.model, ids).logits[0].float().numpy()

    def prefill_ms(self, ids: np.ndarray) -> float:
        import torch

        from ..calibrate.prefix import run_after_prefix

        with torch.inference_mode():
            x = torch.from_numpy(np.asarray(ids, dtype=np.int64)).unsqueeze(0)
            t0 = time.perf_counter()
            run_after_prefix(self.model, x, use_cache=True, logits_to_keep=1)
            return (time.perf_counter() - t0) * 1e3

    def greedy(self, prompt: list, new_tokens: int) -> tuple:
        """(new ids, seconds of the new_tokens - 1 steps after the prompt's prefill)."""
        import torch

        from ..calibrate.prefix import run_after_prefix

        with torch.inference_mode():
            out = run_after_prefix(self.model, torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            new = [nxt]
            t0 = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = run_after_prefix(self.model, torch.tensor([[nxt]]), past=past, use_cache=True)
                past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
                new.append(nxt)
            return new, time.perf_counter() - t0


class RuntimeSide:
    """A quantized folder on the native runtime (osengine.runtime.native)."""

    def __init__(self, native_model, threads: int, label: str):
        self.model, self.label, self.threads = native_model, label, threads
        self.nbytes = native_model.nbytes
        self._contexts = {}

    def _context(self, n_ctx: int):
        if n_ctx not in self._contexts:
            self._contexts[n_ctx] = self.model.context(n_ctx=n_ctx, n_batch=PREFILL_TOKENS, n_threads=self.threads)
        context = self._contexts[n_ctx]
        context.kv_clear()
        return context

    def logits(self, window: np.ndarray) -> np.ndarray:
        return self._context(len(window)).decode(window, all_logits=True)

    def prefill_ms(self, ids: np.ndarray) -> float:
        context = self._context(len(ids))
        t0 = time.perf_counter()
        context.decode(ids)
        return (time.perf_counter() - t0) * 1e3

    def greedy(self, prompt: list, new_tokens: int) -> tuple:
        context = self._context(len(prompt) + new_tokens)
        nxt = int(context.decode(prompt)[0].argmax())
        new = [nxt]
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            nxt = int(context.decode([nxt])[0].argmax())
            new.append(nxt)
        return new, time.perf_counter() - t0


# -- loading ----------------------------------------------------------------------------------------------------------

def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2 ** 20


def _module_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _quantized_side(folder: Path, threads: int, fp_head: bool) -> tuple:
    """(side, note): the native runtime, or the Python engine when the runtime is not built or cannot run it."""
    head = "fp32 lm_head" if fp_head else "int8 lm_head"
    try:
        from ..runtime.native import load_native

        return RuntimeSide(load_native(folder, quantize_embeddings=not fp_head), threads,
                           f"native runtime, {head}"), None
    except Exception as e:  # NativeRuntimeUnavailable, LoadError (an architecture or format it does not run)
        reason = f"{type(e).__name__}: {e}"
    import torch  # noqa: F401  (the fallback runs on torch)

    from ..io.quantized_model import load_quantized
    from ..runtime.convert import convert_to_engine

    model, _, _ = load_quantized(folder)
    model = convert_to_engine(model, quantize_embeddings=not fp_head)
    note = f"the native runtime cannot run this folder ({reason}); the quantized side runs on the Python engine " \
           f"(osengine.load) instead"
    return TorchSide(model.eval(), f"Python engine, {head}", _module_bytes(model)), note


def _windows(args, fp_model, tokenizer, n_positions: int) -> tuple:
    from ..calibrate.data import generated_samples
    from ..evaluation import GENERATED_SEED, EvaluationError

    seq_len = min(args.seq_len, n_positions)
    if seq_len < 2 or args.windows < 1:
        raise CompareError(f"--seq-len must be at least 2 and --windows at least 1, got {args.seq_len} and "
                           f"{args.windows}")
    if args.ppl == "generated":
        ids = generated_samples(fp_model, tokenizer, args.windows, seq_len, seed=GENERATED_SEED)
        return ids.numpy(), "text generated by the FP model"
    path = Path(args.ppl)
    if not path.is_file():
        raise EvaluationError(f"--ppl file {str(path)!r} does not exist (or say 'generated')")
    ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    n = min(args.windows, len(ids) // seq_len)
    if n == 0:
        raise EvaluationError(f"{path} has {len(ids)} tokens, fewer than one window of {seq_len}")
    return np.asarray(ids[:n * seq_len], dtype=np.int64).reshape(n, seq_len), path.name


# -- the comparison ---------------------------------------------------------------------------------------------------

def compare(args) -> dict:
    from ..io.checkpoint import CheckpointError
    from ..io.quantized_model import is_checkpoint, load_quantized_manifest
    from .bench_native import perplexity_from

    folder = Path(args.model)
    if not folder.is_dir():
        raise CompareError(f"{str(folder)!r} does not exist; make it with osengine quantize MODEL --out "
                           f"{folder.name}")
    if not is_checkpoint(folder):
        raise CompareError(f"{str(folder)!r} is not a quantized folder (no osengine.json); make one with "
                           f"osengine quantize MODEL --out DIR")
    try:
        manifest = load_quantized_manifest(folder)
    except CheckpointError as e:
        raise CompareError(f"{str(folder)!r}: {e}") from None
    base = args.base or manifest.get("base_model")
    if not base or base == "(in-memory module)":
        raise CompareError(f"{str(folder)!r} was quantized from an in-memory module, so its floating-point base is "
                           f"unknown; give it with --base MODEL")
    if args.new_tokens < 2:
        raise CompareError(f"--new-tokens must be at least 2, got {args.new_tokens}")
    if args.threads < 1:
        raise CompareError(f"--threads must be positive, got {args.threads}")

    import torch

    from ..io.sources import load_fp_model

    torch.set_num_threads(args.threads)
    t_start = time.time()
    fp_model, tokenizer = load_fp_model(base)
    fp = TorchSide(fp_model, "transformers fp32", _module_bytes(fp_model))
    quant, note = _quantized_side(folder, args.threads, args.fp_head)
    load_seconds = time.time() - t_start

    n_positions = getattr(fp_model.config, "max_position_embeddings", None) or 2048
    t0 = time.time()
    windows, text = _windows(args, fp_model, tokenizer, n_positions)
    text_seconds = time.time() - t0

    ppl = {name: perplexity_from(side.logits, windows) for name, side in (("fp", fp), ("quantized", quant))}

    prefill_ids = windows.reshape(-1)[:min(PREFILL_TOKENS, n_positions, windows.size)]
    prefill = {name: min(side.prefill_ms(prefill_ids) for _ in range(2)) for name, side in
               (("fp", fp), ("quantized", quant))}

    prompt = tokenizer(args.prompt)["input_ids"]
    if not prompt:
        raise CompareError("--prompt gives no tokens")
    if len(prompt) + args.new_tokens > n_positions:
        raise CompareError(f"--prompt and --new-tokens need {len(prompt) + args.new_tokens} positions; the model "
                           f"has {n_positions}")
    eos = tokenizer.eos_token_id
    decode, samples = {}, {}
    for name, side in (("fp", fp), ("quantized", quant)):
        new, seconds = side.greedy(prompt, args.new_tokens)
        decode[name] = (args.new_tokens - 1) / seconds
        if eos is not None and eos in new:
            new = new[:new.index(eos)]
        samples[name] = tokenizer.decode(new, skip_special_tokens=True)

    result = {
        "model": str(folder), "base_model": str(base), "recipe": manifest["recipe"]["name"],
        "strategy": manifest.get("strategy"), "threads": args.threads,
        "fp": {"engine": fp.label, "perplexity": ppl["fp"]["perplexity"], "decode_tokens_per_s": decode["fp"],
               "prefill_ms": prefill["fp"], "parameters_mb": fp.nbytes / 2 ** 20, "sample": samples["fp"]},
        "quantized": {"engine": quant.label, "perplexity": ppl["quantized"]["perplexity"],
                      "decode_tokens_per_s": decode["quantized"], "prefill_ms": prefill["quantized"],
                      "folder_mb": _folder_mb(folder), "memory_mb": quant.nbytes / 2 ** 20,
                      "sample": samples["quantized"]},
        "perplexity_text": text, "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
        "prefill_tokens": int(prefill_ids.size), "prompt": args.prompt, "new_tokens": args.new_tokens,
        "fallback": note,
        "seconds": {"load": load_seconds, "text": text_seconds, "total": time.time() - t_start},
    }
    for side in ("fp", "quantized"):
        if not math.isfinite(result[side]["perplexity"]):
            raise CompareError(f"the {side} model's perplexity is not finite")
    result["meaning"] = meaning(result)
    return result


def meaning(r: dict) -> str:
    fp, q = r["fp"], r["quantized"]
    change = q["perplexity"] / fp["perplexity"] - 1
    if change <= 0.02:
        accuracy = "predicts text about as well as the original"
    elif change <= 0.10:
        accuracy = "predicts text slightly worse than the original"
    else:
        accuracy = "predicts text noticeably worse than the original"
    smaller = fp["parameters_mb"] / q["memory_mb"]
    faster = q["decode_tokens_per_s"] / fp["decode_tokens_per_s"]
    return (f"the quantized model {accuracy} (perplexity {change:+.1%}; lower is better), holds its weights in "
            f"{smaller:.1f}x less memory and writes text {faster:.1f}x "
            f"{'faster' if faster >= 1 else 'slower'} on {r['threads']} CPU thread{'s' if r['threads'] > 1 else ''}.")


def _ratio(fp: float, q: float) -> str:
    return f"{fp / q:.1f}x" if q > 0 else "-"


def format_summary(r: dict) -> str:
    fp, q, sec = r["fp"], r["quantized"], r["seconds"]
    w = 26
    lines = [f"{r['model']} ({r['recipe']}, {r['strategy']}) vs its FP base {r['base_model']}, "
             f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}"]
    if r["fallback"]:
        lines.append(f"note: {r['fallback']}")
    lines += [
        f"{'':<{w}}{'FP':>14}{'quantized':>14}",
        f"{'':<{w}}{'(' + fp['engine'].split(' ')[0] + ')':>14}{'(' + q['engine'].split(',')[0] + ')':>14}",
        f"{'perplexity':<{w}}{fp['perplexity']:>14.3f}{q['perplexity']:>14.3f}   "
        f"{q['perplexity'] / fp['perplexity'] - 1:+.1%}  ({r['windows']} x {r['seq_len']} tokens of "
        f"{r['perplexity_text']})",
        f"{'decode tokens/s (batch 1)':<{w}}{fp['decode_tokens_per_s']:>14.1f}{q['decode_tokens_per_s']:>14.1f}   "
        f"{q['decode_tokens_per_s'] / fp['decode_tokens_per_s']:.1f}x faster",
        f"{'prefill ' + str(r['prefill_tokens']) + ' tokens (ms)':<{w}}{fp['prefill_ms']:>14.0f}"
        f"{q['prefill_ms']:>14.0f}   {_ratio(fp['prefill_ms'], q['prefill_ms'])} faster",
        f"{'weights in memory (MB)':<{w}}{fp['parameters_mb']:>14.0f}{q['memory_mb']:>14.0f}   "
        f"{_ratio(fp['parameters_mb'], q['memory_mb'])} smaller ({q['engine']}; folder on disk "
        f"{q['folder_mb']:.0f} MB)",
        f"sample, greedy after {r['prompt']!r}:",
        f"  FP:        {_one_line(r['prompt'] + fp['sample'])}",
        f"  quantized: {_one_line(r['prompt'] + q['sample'])}",
        f"what this means: {r['meaning']}",
        f"(measured in {sec['total']:.0f} s: loading {sec['load']:.0f} s, writing the text {sec['text']:.0f} s, "
        f"measuring {sec['total'] - sec['load'] - sec['text']:.0f} s)",
    ]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(args) -> int:
    result = compare(args)
    print(json.dumps(result) if args.json else format_summary(result))
    return 0
