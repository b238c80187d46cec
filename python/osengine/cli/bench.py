"""End-to-end speed of a language model on the engine against its floating-point original (`osengine bench`).

What is measured, per impl (each impl, or pair of impls that share one model, lives in its own process so that its
peak memory is its own):

  prefill   model(input_ids [batch, tokens], logits_to_keep=1): the forward pass that fills the KV cache before
            generation; only the last position's logits are computed (all a generator needs), for every impl alike.
  decode    greedy decoding with the KV cache: after an untimed prefill of a --prompt-len prompt, --new-tokens steps
            of model(next_token [batch, 1], past_key_values) + argmax, timed together; tokens/s = batch * steps / s.

Impls: fp32 (CPU) / fp16 (CUDA): the Hugging Face model in floating point. w8a8, w4a8, w4a4: the model quantized by
`osengine.quantize` (recipes w8a8-static, w4a8-group, w4a4-engine; --strategy, a small calibration; w4a4 rotated
first: strategy rotate+STRATEGY, its down_proj input Hadamard-transformed inside the quantize kernel) and converted
to the engine with `convert_to_engine(model, fuse=True, quantize_embeddings=True)` (what a deployment runs: int
GEMMs, q/k/v and gate/up sharing one quantization and one GEMM, int8 embedding table and lm_head), or reloaded with
`osengine.load` when the model is a saved quantized folder. w8a8_shift_fused / w8a8_shift_separate: W8A8 calibrated
with OS+ and shift=runtime, the shift subtracted inside the quantize kernel / in a separate elementwise pass before
it. Extra impls on request: w8a8_unfused (no shared-input fusion), w8a8_fp_embed (embedding and lm_head kept in
fp32), w4a4 and runtime-w4a4 (rotated W4A4 on the engine-backed model / the native runtime).

Method: the models are built one after the other, then measured interleaved: at each point every impl runs its
--warmup untimed runs, then the --repeats timed runs go round the impls in turn (the first impl rotating each round),
so that a machine that gets busier or quieter during the run slows every impl alike and the ratios stay fair on a
shared host. Timing: time.perf_counter around one call (CUDA synchronized); the record holds the median (`ms`) and
the spread (min, max, interquartile range). Memory: `model_mb` is what the model holds (parameters
and buffers, each storage once, plus the engine's packed weights: osengine.runtime.memory.model_memory); `peak_mem_mb`
is the process's peak resident set over that impl's runs at that point (Linux VmHWM, reset before the first; on
CUDA: peak CUDA memory allocated by torch plus the engine's packed weights). MB = 10^6 bytes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

DEFAULT_PREFILL = "1x128,1x512,8x128"
DEFAULT_DECODE_BATCH = "1,8"
RUNTIME_IMPLS = ["runtime-w8a8", "runtime-w4a8", "runtime-w4a4"]
LLAMACPP_IMPLS = ["llamacpp-q8_0", "llamacpp-q4_0", "llamacpp-f32"]
FOLDER_IMPL = "runtime:"   # runtime:FOLDER, the native runtime on a saved quantized folder (osengine quantize --out)
CPU_IMPLS = ["fp32", "w8a8", "w4a8", "runtime-w8a8", "runtime-w4a8", *LLAMACPP_IMPLS]
CUDA_IMPLS = ["fp16", "w8a8", "w4a8", "w8a8_shift_fused", "w8a8_shift_separate"]
EXTRA_IMPLS = ["w8a8_shift_fused", "w8a8_shift_separate", "w8a8_unfused", "w8a8_fp_embed", "w4a4", "runtime-w4a4"]
FLOAT_IMPLS = ("fp32", "fp16", "bf16")
RECIPES = {"w8a8": "w8a8-static", "w4a8": "w4a8-group", "w4a4": "w4a4-engine"}


def is_folder_impl(impl: str) -> bool:
    """runtime:FOLDER, a folder quantized before."""
    return impl.startswith(FOLDER_IMPL)


def is_runtime_impl(impl: str) -> bool:
    """runtime-w8a8 / -w4a8 / -w4a4 (quantized here) or runtime:FOLDER."""
    return impl in RUNTIME_IMPLS or is_folder_impl(impl)


def is_native_impl(impl: str) -> bool:
    """Impls measured without torch: the native runtime's and llama.cpp's."""
    return is_runtime_impl(impl) or impl in LLAMACPP_IMPLS


def impl_strategy(impl: str, strategy: str) -> str:
    """The calibration strategy of an impl: W4A4 needs the rotation (QuaRot; strategy rotate), composed with the
    bench's --strategy unless that is minmax (no migration) or already rotates."""
    if not impl.replace("runtime-", "").startswith("w4a4") or "rotate" in strategy.split("+"):
        return strategy
    return "rotate" if strategy == "minmax" else f"rotate+{strategy}"
REQUIRED_FIELDS = {"device": str, "impl": str, "phase": str, "batch": int, "tokens": int, "ms": float,
                   "tokens_per_s": float, "peak_mem_mb": float}


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


RANDOM_MODELS = ["llama7b", "smollm2", "tiny"]


def random_model(kind: str, dtype=None, device: str = "cpu"):
    """A LLaMA with random weights: 'llama7b' (LLaMA-7B shapes), 'smollm2' (SmolLM2-135M's shapes, for a machine
    without its weights package: speed does not depend on the values) or 'tiny' (for tests)."""
    import torch
    import transformers

    if kind == "llama7b":
        cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                       max_position_embeddings=4096)
    elif kind == "smollm2":
        cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                       max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)
    elif kind == "tiny":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                       max_position_embeddings=256)
    else:
        raise ValueError(f"random model {kind!r}: expected one of {', '.join(RANDOM_MODELS)}")
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype or torch.float32).eval()


def _vocab(model) -> int:
    return int(model.config.vocab_size)


def _calibration(model, tokenizer, args):
    """Calibration data: token ids for random models, else the --calib text (or 'generated')."""
    import torch

    if args.random or tokenizer is None:
        g = torch.Generator().manual_seed(1)
        return torch.randint(0, _vocab(model), (args.calib_samples, args.calib_seq_len), generator=g)
    return args.calib


def _keep_float_parts(model, dtype):
    """Cast everything but the engine's modules (whose scales stay float32) to `dtype`."""
    from ..runtime.embedding import EngineEmbedding
    from ..runtime.linear import EngineLinear

    for m in model.modules():
        if isinstance(m, EngineEmbedding):
            m.out_dtype = dtype  # its lookups feed the rest of the model in that dtype
        if isinstance(m, (EngineLinear, EngineEmbedding)):
            continue
        for _, p in list(m.named_parameters(recurse=False)):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and "inv_freq" not in name:
                setattr(m, name, b.to(dtype))


def build_model(impl: str, args):
    """The model `impl` runs, ready for inference (eval, on the device)."""
    import torch

    from .. import api
    from ..io.quantized_model import is_checkpoint, load_quantized_manifest
    from ..io.sources import load_fp_model
    from ..runtime.convert import convert_to_engine
    from ..runtime.embedding import quantize_embeddings
    from ..runtime.memory import set_shift_mode

    device = args.device
    float_dtype = torch.float16 if device == "cuda" else torch.float32
    source = args.model
    if impl in FLOAT_IMPLS:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[impl]
        if args.random:
            return random_model(args.random, dtype, device)
        if is_checkpoint(source):
            source = load_quantized_manifest(source)["base_model"]
        model, _ = load_fp_model(source, dtype=dtype, device=device)
        return model
    fuse = impl != "w8a8_unfused"
    int8_embeddings = impl != "w8a8_fp_embed" and not args.fp_embeddings
    if not args.random and is_checkpoint(source):  # a saved quantized folder: reload it on the engine
        backend = "cuda" if device == "cuda" else "auto"
        model, _ = api.load(source, backend=backend)
        if int8_embeddings:
            quantize_embeddings(model, backend=backend)
    else:
        if args.random:
            model, tokenizer = random_model(args.random, torch.float32, device), None
        else:
            model, tokenizer = load_fp_model(source, device=device)
        recipe, strategy, options = (RECIPES.get(impl.split("_")[0], "w8a8-static"),
                                     impl_strategy(impl, args.strategy), {})
        if impl.startswith("w8a8_shift"):
            strategy, options = "osplus", {"shift": "runtime"}
        if args.recipe and impl.startswith("w8a8"):
            recipe = args.recipe
        api.quantize(model, recipe=recipe, strategy=strategy, strategy_options=options,
                     calibration=_calibration(model, tokenizer, args), tokenizer=tokenizer,
                     n_samples=args.calib_samples, seq_len=args.calib_seq_len, batch_size=args.calib_samples,
                     device=device, progress=False)
        convert_to_engine(model, fuse=fuse, quantize_embeddings=int8_embeddings)
    if impl.startswith("w8a8_shift"):
        set_shift_mode(model, "separate" if impl.endswith("separate") else "fused")
    if device == "cuda":
        _keep_float_parts(model, float_dtype)
    return model.eval()


def _release_cached_cuda_memory() -> None:
    """Give the float model's freed memory back to the device: the impls' processes share one GPU, and torch's
    caching allocator would otherwise keep what quantizing a LLaMA-7B in fp32 took (27 GB) reserved."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def _saved_folder(impl: str, n_vocab: int) -> str:
    """The folder of a runtime:FOLDER impl, checked: a quantized folder of a model with MODEL's vocabulary (the
    same token ids are fed to every impl)."""
    from ..io.quantized_model import is_checkpoint

    folder = Path(impl[len(FOLDER_IMPL):])
    if not is_checkpoint(folder):
        raise ValueError(f"--impl {impl}: {str(folder)!r} is not a quantized folder (osengine quantize --out "
                         "writes one)")
    vocab = json.loads((folder / "config.json").read_text()).get("vocab_size")
    if vocab != n_vocab:
        raise ValueError(f"--impl {impl}: the folder's model has a vocabulary of {vocab} tokens, MODEL's has "
                         f"{n_vocab}; compare folders of the same base model as MODEL")
    return str(folder)


def _native_sizes(args) -> tuple:
    """(n_ctx per sequence, sequences) a native impl's context needs for every measurement point."""
    longest = max([t for _, t in args.prefill_points] + [args.prompt_len + args.new_tokens + 1,
                                                           args.prepared.get("ppl_seq_len", 0)])
    return longest, max([b for b, _ in args.prefill_points] + args.decode_batches)


def build_native(impl: str, args):
    """The adapter of a runtime-* or llamacpp-* impl, from the artifacts the driver prepared (no torch here)."""
    from . import bench_native

    n_ctx, n_seq = _native_sizes(args)
    artifact = args.prepared.get(impl)
    if artifact is None:
        raise RuntimeError(f"{impl}: the driver prepared nothing for it")
    if is_runtime_impl(impl):
        return bench_native.RuntimeImpl(artifact, args.threads, n_ctx, n_seq,
                                        quantize_embeddings=not args.fp_embeddings)
    return bench_native.LlamaCppImpl(artifact, args.threads, n_ctx, n_seq)


def _native_ids(args, shape: tuple, seed: int):
    import numpy as np

    vocab = args.prepared["n_vocab"]
    return np.random.default_rng(seed).integers(min(100, vocab // 2), vocab, size=shape, dtype=np.int64)


def prepare(args) -> dict:
    """What the native impls and the perplexity column need, made once here in the driver (whose memory is not
    measured) so that the measuring processes of runtime-* and llamacpp-* import neither torch nor transformers:
    the quantized folders of the runtime impls (`osengine.quantize` with the bench's recipe, strategy and
    calibration; runtime-w8a8 runs MODEL itself when it is a quantized folder, runtime:FOLDER runs FOLDER), the
    GGUFs of the llama.cpp impls (MODEL's GGUF requantized with llama.cpp's own quantize API) and the token windows
    of --ppl."""
    runtime = [i for i in args.impls if is_runtime_impl(i)]
    llama = [i for i in args.impls if i in LLAMACPP_IMPLS]
    if not (runtime or llama or args.ppl):
        return {}
    import numpy as np

    from .. import api
    from ..evaluation import EvaluationError
    from ..io.quantized_model import is_checkpoint, load_quantized_manifest
    from ..io.sources import ModelLoadError, load_fp_model, resolve_source
    from . import bench_native

    if args.random:
        raise ValueError("the runtime-*, llamacpp-* impls and --ppl need a real model, not --random")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="osengine-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    source = args.model
    prepared = {"work_dir": str(work)}
    if is_checkpoint(source):
        if "runtime-w8a8" in runtime:
            prepared["runtime-w8a8"] = str(source)
        source = load_quantized_manifest(source)["base_model"]
    print(f"preparing in {work} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_fp_model(source)
    prepared["n_vocab"] = int(model.config.vocab_size)
    if args.ppl:
        path = Path(args.ppl)
        if not path.is_file():
            raise EvaluationError(f"--ppl file {str(path)!r} does not exist")
        # the bytes as osengine eval reads them (no newline translation: a CRLF file keeps its \r)
        ids = tokenizer(path.read_bytes().decode("utf-8", errors="replace"), return_tensors="np",
                        add_special_tokens=False)["input_ids"][0]
        n = min(args.ppl_windows, len(ids) // args.ppl_seq_len)
        if n == 0:
            raise EvaluationError(f"{path} has {len(ids)} tokens, fewer than one window of {args.ppl_seq_len}")
        np.save(work / "ppl_windows.npy", ids[: n * args.ppl_seq_len].reshape(n, args.ppl_seq_len).astype(np.int64))
        prepared["ppl_windows"], prepared["ppl_seq_len"] = str(work / "ppl_windows.npy"), args.ppl_seq_len
    for impl in runtime:
        if impl in prepared:
            continue
        if is_folder_impl(impl):
            prepared[impl] = _saved_folder(impl, prepared["n_vocab"])
            continue
        recipe = args.recipe if (args.recipe and impl == "runtime-w8a8") else bench_native.RUNTIME_IMPLS[impl]
        folder = work / impl
        # a folder this --work-dir already holds from the same source, recipe and calibration is reused
        strategy = impl_strategy(impl, args.strategy)
        stamp = {"source": str(source), "recipe": recipe, "strategy": strategy, "calib": str(args.calib),
                 "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len}
        stamp_file = folder / "bench-stamp.json"
        if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and is_checkpoint(folder):
            print(f"[{impl}] reusing {folder}", file=sys.stderr, flush=True)
            prepared[impl] = str(folder)
            continue
        print(f"[{impl}] quantizing ({recipe}, {strategy}) into {folder} ...", file=sys.stderr, flush=True)
        fresh, _ = load_fp_model(source)
        api.quantize(fresh, recipe=recipe, strategy=strategy, calibration=_calibration(fresh, tokenizer, args),
                     tokenizer=tokenizer, n_samples=args.calib_samples, seq_len=args.calib_seq_len,
                     batch_size=args.calib_samples, out=folder, progress=False)
        stamp_file.write_text(json.dumps(stamp))
        prepared[impl] = str(folder)
        del fresh
    if llama:
        gguf = resolve_source(source)
        if gguf.suffix != ".gguf":
            raise ModelLoadError(f"the llamacpp-* impls requantize a GGUF file; {source} is {gguf}")
        for impl in llama:
            kind = bench_native.LLAMACPP_IMPLS[impl][0]
            prepared[impl] = bench_native.make_gguf(str(gguf), kind, str(work / "gguf"))
    del model
    gc.collect()
    return prepared


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of this process during a measurement: Linux VmHWM (reset through /proc/self/clear_refs), or on
    CUDA torch's peak allocation plus the engine's packed weights (which torch's allocator does not see)."""

    def __init__(self, device: str, extra_bytes: int = 0):
        self.device, self.extra = device, extra_bytes

    def reset(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages (quantization leftovers) to the OS
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak_mb(self) -> float:
        if self.device == "cuda":
            import torch

            return (torch.cuda.max_memory_allocated() + self.extra) / 1e6
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024 / 1e6
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _ids(model, batch: int, tokens: int, seed: int, device: str):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(100, _vocab(model) // 2), _vocab(model), (batch, tokens), generator=g).to(device)


def _summary(samples: List[float]) -> dict:
    qs = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {"ms": statistics.median(samples), "ms_min": min(samples), "ms_max": max(samples),
            "ms_iqr": qs[2] - qs[0], "samples": len(samples)}


def prefill_once(model, ids, device: str) -> float:
    """ms of one prefill forward pass (the last position's logits only)."""
    import torch

    from ..calibrate.prefix import run_after_prefix

    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        run_after_prefix(model, ids, use_cache=True, logits_to_keep=1)
        _sync(device)
        return (time.perf_counter() - t0) * 1e3


def greedy_decode(model, prompt, new_tokens: int, device: str):
    """(ms for the `new_tokens` decode steps, generated ids [batch, 1 + new_tokens]: the prefill's token, then one per
    step); the prompt's prefill is untimed. A model quantized behind a prefix runs behind its stored keys and values."""
    import torch

    from ..calibrate.prefix import run_after_prefix

    with torch.inference_mode():
        out = run_after_prefix(model, prompt, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        generated = [nxt]
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = run_after_prefix(model, nxt, past=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(nxt)
        _sync(device)
        return (time.perf_counter() - t0) * 1e3, torch.cat(generated, dim=1)


def device_name(device: str, threads: int) -> str:
    if device == "cuda":
        import torch

        return f"cuda: {torch.cuda.get_device_name()}"
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return f"cpu: {model or platform.processor() or platform.machine()} ({threads} threads)"


def set_threads(threads: int) -> None:
    import torch

    from ..engine import ops

    torch.set_num_threads(threads)
    ops.set_num_threads(threads)


def measurement_points(args) -> List[tuple]:
    """(phase, batch, tokens) in measuring order: prefill points, then decode batches."""
    return ([("prefill", b, t) for b, t in args.prefill_points]
            + [("decode", b, args.new_tokens) for b in args.decode_batches])


class Runner:
    """One model and the impls that run on it (one process group): runs single samples on request, so that the
    driver can interleave the impls, and summarizes them into records. Peak memory is tracked per impl and point:
    reset before its first sample, read after each."""

    def __init__(self, impls: List[str], args):
        self.impls, self.args = list(impls), args
        self.native = is_native_impl(impls[0])  # no torch in this process
        t0 = time.time()
        extra = {}
        if self.native:
            self.model = build_native(impls[0], args)
            total, packed = self.model.nbytes, 0
            extra["bytes_per_token"] = self.model.bytes_per_token
        else:
            import torch

            from ..runtime.memory import model_memory

            set_threads(args.threads)
            self.model = build_model(impls[0], args)
            if args.device == "cuda":
                _release_cached_cuda_memory()
            memory = model_memory(self.model)
            total, packed = memory["total"], memory["packed"]
            extra["torch"] = torch.__version__
        setup_s = time.time() - t0
        self.memory = PeakMemory(args.device, packed if args.device == "cuda" else 0)
        device = device_name(args.device, args.threads)
        self.base = {impl: {"device": device, "impl": impl,
                            "model": args.random and f"random-{args.random}" or str(args.model),
                            "model_mb": round(total / 1e6, 2), "setup_s": round(setup_s, 2), **extra}
                     for impl in impls}
        self.samples, self.peaks, self.inputs, self.ppl = {}, {}, {}, {}
        self.shift_mode = None

    def _input(self, phase: str, batch: int, tokens: int):
        key = (phase, batch, tokens)
        if key not in self.inputs:
            shape = (batch, tokens) if phase == "prefill" else (batch, self.args.prompt_len)
            seed = tokens + batch if phase == "prefill" else 7 + batch
            if self.native:
                self.inputs[key] = _native_ids(self.args, shape, seed)
            else:
                self.inputs[key] = _ids(self.model, *shape, seed=seed, device=self.args.device)
        return self.inputs[key]

    def sample(self, impl: str, phase: str, batch: int, tokens: int, timed: bool) -> float:
        from ..runtime.memory import set_shift_mode

        if impl.startswith("w8a8_shift") and self.shift_mode != impl:
            set_shift_mode(self.model, "separate" if impl.endswith("separate") else "fused")
            self.shift_mode = impl
        key = (impl, phase, batch, tokens)
        ids = self._input(phase, batch, tokens)
        if key not in self.peaks:
            self.memory.reset()
        if self.native:
            ms = self.model.prefill(ids) if phase == "prefill" else self.model.decode(ids, tokens)
        elif phase == "prefill":
            ms = prefill_once(self.model, ids, self.args.device)
        else:
            ms, _ = greedy_decode(self.model, ids, tokens, self.args.device)
        self.peaks[key] = max(self.peaks.get(key, 0.0), self.memory.peak_mb())
        if timed:
            self.samples.setdefault(key, []).append(ms)
        return ms

    def perplexity(self, impl: str) -> dict:
        """Perplexity of `impl` on the driver's windows (args.prepared["ppl_windows"])."""
        import numpy as np

        windows = np.load(self.args.prepared["ppl_windows"])
        if self.native:
            result = self.model.perplexity(windows)
        else:
            import torch

            from ..evaluation import perplexity_on_windows
            from ..runtime.memory import set_shift_mode

            if impl.startswith("w8a8_shift") and self.shift_mode != impl:
                set_shift_mode(self.model, "separate" if impl.endswith("separate") else "fused")
                self.shift_mode = impl
            result = perplexity_on_windows(self.model, torch.from_numpy(windows).long(), progress=False)
        self.ppl[impl] = result
        return result

    def records(self) -> List[dict]:
        out = []
        for impl in self.impls:
            for phase, batch, tokens in measurement_points(self.args):
                times = self.samples.get((impl, phase, batch, tokens))
                if not times:
                    continue
                s = _summary(times)
                r = {**self.base[impl], "phase": phase, "batch": batch, "tokens": tokens, **s,
                     "tokens_per_s": batch * tokens / (s["ms"] / 1e3),
                     "peak_mem_mb": round(self.peaks[(impl, phase, batch, tokens)], 1)}
                if phase == "decode":
                    r["ms_per_token"] = s["ms"] / tokens
                    r["prompt_tokens"] = self.args.prompt_len
                if impl in self.ppl:
                    r["ppl"] = round(self.ppl[impl]["perplexity"], 4)
                    r["ppl_windows"] = f"{self.ppl[impl]['windows']}x{self.ppl[impl]['seq_len']}"
                for k in ("ms", "ms_min", "ms_max", "ms_iqr", "ms_per_token", "tokens_per_s"):
                    if k in r:
                        r[k] = round(float(r[k]), 3)
                out.append(r)
        return out

    def close(self) -> None:
        pass


class RunnerFailed(RuntimeError):
    pass


PROTOCOL = "@@osengine-bench "  # prefix of the driver <-> child protocol lines on the child's stdout


class ChildRunner:
    """A Runner in its own process (so that its peak memory is its own), driven through JSON lines on its stdin /
    stdout. Raises RunnerFailed when the child dies or answers out of protocol."""

    def __init__(self, impls: List[str], args, env: dict):
        self.impls = list(impls)
        self.proc = subprocess.Popen(_child_argv(args, impls), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=None, text=True, env=env, bufsize=1)
        self._reply()  # "ready" once the model is built

    def _reply(self):
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
            print(line, end="", file=sys.stderr)  # whatever else the child prints
        code = self.proc.wait()
        raise RunnerFailed(f"exit {code}")

    def _ask(self, request: dict):
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise RunnerFailed(f"exit {self.proc.wait()}") from None
        return self._reply()

    def sample(self, impl: str, phase: str, batch: int, tokens: int, timed: bool) -> float:
        return float(self._ask({"cmd": "sample", "impl": impl, "phase": phase, "batch": batch, "tokens": tokens,
                                "timed": timed})["ms"])

    def perplexity(self, impl: str) -> dict:
        return self._ask({"cmd": "perplexity", "impl": impl})

    def records(self) -> List[dict]:
        return self._ask({"cmd": "records"})

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve(impls: List[str], args) -> None:
    """The child side of ChildRunner: build, say ready, answer requests until stdin closes."""
    runner = Runner(impls, args)
    print(PROTOCOL + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "sample":
            ms = runner.sample(request["impl"], request["phase"], request["batch"], request["tokens"],
                               request["timed"])
            print(PROTOCOL + json.dumps({"ms": ms}), flush=True)
        elif request["cmd"] == "perplexity":
            print(PROTOCOL + json.dumps(runner.perplexity(request["impl"])), flush=True)
        elif request["cmd"] == "records":
            print(PROTOCOL + json.dumps(runner.records()), flush=True)


def drive(runners: List, args) -> List:
    """Measure every (runner, impl) at every point: warm-up samples first, then the timed repeats with the impls
    taking turns (the starting impl rotating each round), so that a machine that slows down or speeds up during
    the run affects every impl alike. Returns the runners that did not fail."""
    alive = list(runners)
    for phase, batch, tokens in measurement_points(args):
        times = {}
        for i in range(args.warmup + args.repeats):
            timed = i >= args.warmup
            pairs = [(r, impl) for r in alive for impl in r.impls]
            if timed and pairs:
                shift = (i - args.warmup) % len(pairs)
                pairs = pairs[shift:] + pairs[:shift]
            for runner, impl in pairs:
                if runner not in alive:
                    continue
                try:
                    ms = runner.sample(impl, phase, batch, tokens, timed)
                except RunnerFailed as e:
                    print(f"[{', '.join(runner.impls)}] failed ({e}); skipped", file=sys.stderr, flush=True)
                    alive.remove(runner)
                    continue
                if timed:
                    times.setdefault(impl, []).append(ms)
        for impl, ts in times.items():
            ms = statistics.median(ts)
            print(f"  {impl:<20} {phase:<7} {batch}x{tokens}: {ms:.1f} ms "
                  f"({batch * tokens / (ms / 1e3):.1f} tok/s)", file=sys.stderr, flush=True)
    if getattr(args, "prepared", {}).get("ppl_windows"):
        for runner in list(alive):
            for impl in runner.impls:
                try:
                    result = runner.perplexity(impl)
                except RunnerFailed as e:
                    print(f"[{', '.join(runner.impls)}] failed ({e}); skipped", file=sys.stderr, flush=True)
                    alive.remove(runner)
                    break
                print(f"  {impl:<20} perplexity {result['perplexity']:.3f} ({result['windows']}x"
                      f"{result['seq_len']} tokens, {result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return alive


def run_impls(impls: List[str], args) -> List[dict]:
    """Build the model once in this process and measure every impl in `impls` (impls that share one model)."""
    runner = Runner(impls, args)
    drive([runner], args)
    return runner.records()


# ----------------------------------------------------------------------------------------------------------------
# Driver: one process per model
# ----------------------------------------------------------------------------------------------------------------


def process_groups(impls: List[str]) -> List[List[str]]:
    """Impls that run on the same model share a process (the shift pair); every other impl gets its own."""
    groups, shift = [], [i for i in impls if i.startswith("w8a8_shift")]
    for impl in impls:
        if impl in shift:
            if impl == shift[0]:
                groups.append(shift)
        else:
            groups.append([impl])
    return groups


def _child_argv(args, impls: List[str]) -> List[str]:
    argv = [sys.executable, "-m", "osengine.cli.bench", "--serve", ",".join(impls)]
    for key in ("device", "threads", "warmup", "repeats", "prompt_len", "new_tokens", "strategy", "calib",
                "calib_samples", "calib_seq_len", "recipe", "random"):
        value = getattr(args, key)
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    argv += ["--prefill", args.prefill, "--decode-batch", args.decode_batch]
    if args.fp_embeddings:
        argv.append("--fp-embeddings")
    if getattr(args, "prepared_file", None):
        argv += ["--prepared-file", args.prepared_file]
    if args.model is not None:
        argv.append(str(args.model))
    return argv


def measure_bandwidth(args) -> Optional[float]:
    """GB/s that --threads threads read from memory (osengine._C.read_bandwidth), for the decode bound."""
    if args.device != "cpu" or not any(is_native_impl(i) for i in args.impls):
        return None
    from .. import _C

    if not hasattr(_C, "read_bandwidth"):
        return None
    gbps = _C.read_bandwidth(512 << 20, args.threads, 5) / 1e9
    print(f"memory read bandwidth with {args.threads} threads: {gbps:.1f} GB/s", file=sys.stderr, flush=True)
    return gbps


def run(args) -> List[dict]:
    """Build every model (each in its own process, one after the other), then measure them interleaved (`drive`).
    Records in impl order; an impl whose process fails is reported and skipped."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    args.prepared = prepare(args)
    if args.prepared:
        args.prepared_file = str(Path(args.prepared["work_dir"]) / "prepared.json")
        Path(args.prepared_file).write_text(json.dumps(args.prepared))
    args.read_gbps = measure_bandwidth(args)
    runners = []
    try:
        for group in process_groups(args.impls):
            print(f"[{', '.join(group)}] building ...", file=sys.stderr, flush=True)
            try:
                runners.append(Runner(group, args) if args.in_process else ChildRunner(group, args, env))
            except RunnerFailed as e:
                print(f"[{', '.join(group)}] failed ({e}); skipped", file=sys.stderr, flush=True)
        print(f"measuring {', '.join(i for r in runners for i in r.impls)} interleaved ...", file=sys.stderr,
              flush=True)
        alive = drive(runners, args)
        by_impl = {}
        for runner in alive:
            try:
                for record in runner.records():
                    by_impl.setdefault(record["impl"], []).append(record)
            except RunnerFailed as e:
                print(f"[{', '.join(runner.impls)}] failed ({e}); skipped", file=sys.stderr, flush=True)
        records = [r for impl in args.impls for r in by_impl.get(impl, [])]
        for r in records:
            if args.read_gbps and r.get("bytes_per_token"):
                r["read_gbps"] = round(args.read_gbps, 2)
                r["bandwidth_bound_tokens_per_s"] = round(args.read_gbps * 1e9 / r["bytes_per_token"], 1)
        return records
    finally:
        for runner in runners:
            runner.close()


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------


def _reference_impl(records: List[dict]) -> Optional[str]:
    impls = {r["impl"] for r in records}
    return next((i for i in FLOAT_IMPLS if i in impls), None)


def table(records: List[dict]) -> str:
    ref = _reference_impl(records)
    lookup = {(r["impl"], r["phase"], r["batch"], r["tokens"]): r for r in records}
    with_ppl = any("ppl" in r for r in records)
    with_bound = any("bandwidth_bound_tokens_per_s" in r for r in records)
    lines = ["| impl | phase | batch x tokens | ms (median) | spread (IQR) | tokens/s | vs " + (ref or "float")
             + (" | of bandwidth bound" if with_bound else "") + " | model MB | peak RSS MB |"
             + (" perplexity |" if with_ppl else ""),
             "|---|---|---|---:|---:|---:|---:|" + ("---:|" if with_bound else "") + "---:|---:|"
             + ("---:|" if with_ppl else "")]
    for r in records:
        base = lookup.get((ref, r["phase"], r["batch"], r["tokens"]))
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        spread = f"±{100 * r['ms_iqr'] / 2 / r['ms']:.0f}%" if r["ms"] else "-"
        bound = ""
        if with_bound:
            b = r.get("bandwidth_bound_tokens_per_s")
            bound = f" {100 * r['tokens_per_s'] / b:.0f}% |" if b and r["phase"] == "decode" and r["batch"] == 1 \
                else " - |"
        lines.append(f"| {r['impl']} | {r['phase']} | {r['batch']} x {r['tokens']} | {r['ms']:.1f} | {spread} | "
                     f"{r['tokens_per_s']:.1f} | {speedup} |{bound} {r['model_mb']:.0f} | {r['peak_mem_mb']:.0f} |"
                     + (f" {r['ppl']:.3f} |" if "ppl" in r else (" - |" if with_ppl else "")))
    return "\n".join(lines)


def targets(records: List[dict], device: str) -> List[tuple]:
    """(target, measured, PASS / FAIL / SKIP) for the deployment targets."""
    ref = _reference_impl(records)
    get = {(r["impl"], r["phase"], r["batch"], r["tokens"]): r for r in records}
    out = []

    def ratio(phase, batch, tokens, impl="w8a8"):
        a, b = get.get((impl, phase, batch, tokens)), get.get((ref, phase, batch, tokens))
        return a["tokens_per_s"] / b["tokens_per_s"] if a and b else None

    def check(name, value, goal):
        out.append((name, "-" if value is None else f"{value:.2f}x",
                    "SKIP" if value is None else ("PASS" if value >= goal else "FAIL")))

    decode_tokens = {r["tokens"] for r in records if r["phase"] == "decode"}
    if device == "cuda":
        big = max(((r["batch"] * r["tokens"], r["batch"], r["tokens"]) for r in records if r["phase"] == "prefill"),
                  default=None)
        check(f"prefill {big[1]}x{big[2]} w8a8 >= 1.3x {ref}" if big else "prefill w8a8 >= 1.3x fp16",
              ratio("prefill", big[1], big[2]) if big else None, 1.3)
        return out
    def versus(impl, peer, phase, batch, tokens):
        a, b = get.get((impl, phase, batch, tokens)), get.get((peer, phase, batch, tokens))
        return a["tokens_per_s"] / b["tokens_per_s"] if a and b else None

    if any(r["impl"] in RUNTIME_IMPLS for r in records):
        t = next(iter(decode_tokens), None)
        check("decode batch 1 runtime-w8a8 >= 1.3x llamacpp-q8_0", versus("runtime-w8a8", "llamacpp-q8_0",
                                                                           "decode", 1, t), 1.3)
        check("decode batch 1 runtime-w4a8 >= 1.3x llamacpp-q4_0", versus("runtime-w4a8", "llamacpp-q4_0",
                                                                           "decode", 1, t), 1.3)
        w8 = get.get(("runtime-w8a8", "decode", 1, t))
        bound = w8 and w8.get("bandwidth_bound_tokens_per_s")
        out.append(("decode batch 1 runtime-w8a8 >= 60% of the bandwidth bound",
                    f"{100 * w8['tokens_per_s'] / bound:.0f}%" if bound else "-",
                    "SKIP" if not bound else ("PASS" if w8["tokens_per_s"] >= 0.6 * bound else "FAIL")))
        check("prefill 1x512 runtime-w8a8 >= 2.0x llamacpp-q8_0", versus("runtime-w8a8", "llamacpp-q8_0",
                                                                          "prefill", 1, 512), 2.0)
        peaks = {i: max((r["peak_mem_mb"] for r in records if r["impl"] == i), default=None)
                 for i in ("runtime-w8a8", "llamacpp-q8_0")}
        ours, theirs = peaks["runtime-w8a8"], peaks["llamacpp-q8_0"]
        out.append(("peak RSS runtime-w8a8 <= llamacpp-q8_0", f"{ours:.0f} vs {theirs:.0f} MB" if ours and theirs
                    else "-", "SKIP" if not (ours and theirs) else ("PASS" if ours <= theirs else "FAIL")))
        load = next((r["setup_s"] for r in records if r["impl"] == "runtime-w8a8"), None)
        out.append(("load runtime-w8a8 <= 1 s", "-" if load is None else f"{load:.2f} s",
                    "SKIP" if load is None else ("PASS" if load <= 1.0 else "FAIL")))
    if ref is None:
        return out
    check("prefill 1x512 w8a8 >= 1.5x fp32", ratio("prefill", 1, 512), 1.5)
    for b in (1, 8):
        check(f"decode batch {b} w8a8 >= 2x fp32 tokens/s",
              next((ratio("decode", b, t) for t in decode_tokens), None), 2.0)
    w8 = next((r for r in records if r["impl"] == "w8a8"), None)
    fp = next((r for r in records if r["impl"] == ref), None)
    check("model memory fp32 / w8a8 >= 3.5x", fp["model_mb"] / w8["model_mb"] if w8 and fp else None, 3.5)
    return out


def plot(records: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r["impl"] for r in records))
    prefill = sorted({(r["batch"], r["tokens"]) for r in records if r["phase"] == "prefill"})
    decode = sorted({r["batch"] for r in records if r["phase"] == "decode"})
    get = {(r["impl"], r["phase"], r["batch"], r["tokens"] if r["phase"] == "prefill" else None): r for r in records}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [max(1, len(prefill)),
                                                                                    max(1, len(decode)), 1]})
    width = 0.8 / max(1, len(impls))
    for ax, points, phase, ylabel in ((axes[0], prefill, "prefill", "prefill latency, ms (lower is better)"),
                                      (axes[1], decode, "decode", "decode tokens/s (higher is better)")):
        for j, impl in enumerate(impls):
            rs = [get.get((impl, phase, p[0], p[1]) if phase == "prefill" else (impl, phase, p, None))
                  for p in points]
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(points))]
            vals = [(r["ms"] if phase == "prefill" else r["tokens_per_s"]) if r else 0 for r in rs]
            errs = [[(r["ms"] - r["ms_min"]) if r and phase == "prefill" else 0 for r in rs],
                    [(r["ms_max"] - r["ms"]) if r and phase == "prefill" else 0 for r in rs]]
            ax.bar(xs, vals, width, label=impl, yerr=errs if phase == "prefill" else None, capsize=2)
        ax.set_xticks(range(len(points)))
        ax.set_xticklabels([f"{b}x{t}" for b, t in points] if phase == "prefill" else [f"batch {b}" for b in points])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    mem = [next((r["model_mb"] for r in records if r["impl"] == i), 0) for i in impls]
    axes[2].bar(range(len(impls)), mem, color=[f"C{j}" for j in range(len(impls))])
    axes[2].set_xticks(range(len(impls)))
    axes[2].set_xticklabels(impls, rotation=45, ha="right")
    axes[2].set_ylabel("model memory, MB")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{records[0]['model']} on {records[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Command line (osengine bench, benchmarks/e2e.py)
# ----------------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="Hugging Face folder, .gguf file, registered name (default smollm2-135m), or a quantized "
                        "folder (--out of quantize: reloaded on the engine)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--impl", default=None,
                   help=f"comma-separated impls (default: {','.join(CPU_IMPLS)}; on cuda fp16 instead of fp32; "
                        f"more: {','.join(EXTRA_IMPLS)}; and {FOLDER_IMPL}FOLDER: the native runtime on a folder "
                        "saved by osengine quantize --out, several of them compared in one interleaved run)")
    p.add_argument("--prefill", default=DEFAULT_PREFILL, help=f"batch x tokens points (default {DEFAULT_PREFILL})")
    p.add_argument("--decode-batch", default=DEFAULT_DECODE_BATCH, help="decode batch sizes (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before decoding (default 16)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps (default 64)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default 5)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and the engine (default 2)")
    p.add_argument("--strategy", default="minmax", help="calibration strategy of w8a8 / w4a8 (default minmax: "
                                                        "cheap; speed does not depend on it)")
    p.add_argument("--recipe", default=None, help="recipe for w8a8 and the shift impls instead of w8a8-static")
    p.add_argument("--calib", default="generated",
                   help="calibration text file, or 'generated' (the default: text the model writes itself)")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--fp-embeddings", action="store_true",
                   help="keep the embedding table and lm_head in floating point (default: int8 on the engine)")
    p.add_argument("--random", choices=RANDOM_MODELS, default=None,
                   help="a LLaMA with random weights instead of MODEL ('llama7b': LLaMA-7B shapes; 'smollm2': "
                        "SmolLM2-135M's)")
    p.add_argument("--random-llama7b", dest="random", action="store_const", const="llama7b",
                   help="same as --random llama7b")
    p.add_argument("--ppl", default=None, metavar="TEXT_FILE",
                   help="also measure each impl's perplexity on --ppl-windows windows of --ppl-seq-len tokens of "
                        "this text (e.g. wiki.test.raw), the same token ids for every impl")
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--work-dir", default=None,
                   help="where the runtime impls' quantized folders and the llama.cpp GGUFs go (default: a new "
                        "temporary folder)")
    p.add_argument("--prepared-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--in-process", action="store_true",
                   help="build and measure every model in this process (no per-impl peak memory)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a plot of the results")
    p.add_argument("--save-json", default=None, metavar="FILE", help="also write the records to FILE")
    p.add_argument("--json", action="store_true", help="print the list of records as JSON (progress on stderr)")


def parse_points(args) -> None:
    try:
        args.prefill_points = [tuple(int(v) for v in p.lower().split("x")) for p in args.prefill.split(",") if p]
        args.decode_batches = [int(b) for b in args.decode_batch.split(",") if b]
    except ValueError:
        raise ValueError(f"--prefill must look like 1x512,8x128 and --decode-batch like 1,8; got {args.prefill!r}, "
                         f"{args.decode_batch!r}") from None
    if any(len(p) != 2 or min(p) < 1 for p in args.prefill_points) or any(b < 1 for b in args.decode_batches):
        raise ValueError(f"--prefill must look like 1x512,8x128 (positive numbers); got {args.prefill!r}")
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 1 or args.prompt_len < 1:
        raise ValueError("--repeats, --new-tokens and --prompt-len must be >= 1 and --warmup >= 0")
    default = CUDA_IMPLS if args.device == "cuda" else CPU_IMPLS
    args.impls = [i for i in (args.impl.split(",") if args.impl else default) if i]
    if args.random and not args.impl:  # they need a real model: quantized folders, GGUFs
        args.impls = [i for i in args.impls if not is_native_impl(i)]
    known = set(CPU_IMPLS + CUDA_IMPLS + EXTRA_IMPLS + list(FLOAT_IMPLS))
    unknown = [i for i in args.impls if i not in known and not is_folder_impl(i)]
    if unknown:
        raise ValueError(f"unknown impl(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if args.ppl_windows < 1 or args.ppl_seq_len < 2:
        raise ValueError("--ppl-windows must be >= 1 and --ppl-seq-len >= 2")
    args.prepared = json.loads(Path(args.prepared_file).read_text()) if args.prepared_file else {}
    missing = unavailable_impls(args.impls)
    if args.device == "cuda" and any(is_native_impl(i) for i in args.impls):
        raise ValueError("the runtime-* and llamacpp-* impls run on the CPU only")
    if missing and args.impl:
        raise ValueError("; ".join(f"{impl}: {why}" for impl, why in missing.items()))
    for impl, why in missing.items():  # left out of the default list, with the reason
        print(f"{impl} skipped: {why}", file=sys.stderr)
        args.impls.remove(impl)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available to torch")


def unavailable_impls(impls: List[str]) -> dict:
    """{impl: why} for the requested impls this installation cannot run."""
    import importlib.util

    from .. import _C

    out = {}
    for impl in impls:
        if is_runtime_impl(impl) and not _C.has_native_runtime():
            out[impl] = "osengine was built without the native runtime (docs/runtime.md)"
        if impl in LLAMACPP_IMPLS and importlib.util.find_spec("llama_cpp") is None:
            out[impl] = "llama-cpp-python is not installed (pip install \"osengine[llamacpp]\")"
    return out


def main(args) -> int:
    parse_points(args)
    records = run(args)
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(records, indent=1))
    if args.plot and records:
        plot(records, args.plot)
    if args.json:
        print(json.dumps(records))
        return 0 if records else 1
    if not records:
        print("no results (every impl failed)", file=sys.stderr)
        return 1
    print(f"{records[0]['model']} on {records[0]['device']}; median of {args.repeats} runs after {args.warmup} "
          f"warm-up; decode: {args.new_tokens} new tokens after a {args.prompt_len}-token prompt\n")
    print(table(records))
    print("\n| target | measured | |\n|---|---:|---|")
    for name, value, verdict in targets(records, args.device):
        print(f"| {name} | {value} | {verdict} |")
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0


def _child_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m osengine.cli.bench")
    add_arguments(p)
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parse_points(args)
    if args.serve:
        serve(args.serve.split(","), args)
        return
    sys.exit(main(args))


if __name__ == "__main__":
    _child_main()
