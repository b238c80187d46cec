"""The benchmark's impls that run without torch: the native runtime (runtime-w8a8, runtime-w4a8) and llama.cpp
through llama-cpp-python (llamacpp-q8_0, llamacpp-q4_0, llamacpp-f32).

Each is a small adapter with the calls the driver in osengine.cli.bench makes: prefill(ids [batch, tokens]) -> ms,
decode(prompt [batch, prompt_len], new_tokens) -> ms (greedy; the prompt's prefill untimed), perplexity(windows
[n, seq_len]) -> dict, and its bytes. Both run token ids in and logits out with the same greedy loop in Python (one
call per step), so the comparison is the engines', not the wrappers'. They are built from artifacts the driver
prepares once (`prepare`): the quantized folders and the GGUF files, so that a measuring process imports neither
torch nor transformers and its peak memory is its own. This module imports neither.
"""
from __future__ import annotations

import ctypes
import math
import time
from pathlib import Path

import numpy as np

RUNTIME_IMPLS = {"runtime-w8a8": "w8a8-static", "runtime-w4a8": "w4a8-group", "runtime-w4a4": "w4a4-engine"}
# llama.cpp file types of its quantize API (llama.h: enum llama_ftype)
LLAMACPP_IMPLS = {"llamacpp-q8_0": ("q8_0", 7), "llamacpp-q4_0": ("q4_0", 2), "llamacpp-f32": ("f32", 0)}


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of targets under rows of logits (float64 reductions)."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float((log_z - logits[np.arange(len(targets)), targets]).sum())


def perplexity_from(logits_of_window, windows: np.ndarray) -> dict:
    """exp(mean NLL) of the next-token predictions inside each window, as osengine.evaluation computes it."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, seq_len >= 2], got shape {windows.shape}")
    nll, count, t0 = 0.0, 0, time.time()
    for window in windows:
        logits = logits_of_window(window)
        if not np.isfinite(logits).all():
            raise ValueError("the model produced non-finite logits")
        nll += _log_softmax_nll(logits[:-1], window[1:])
        count += len(window) - 1
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]), "tokens": count, "seconds": time.time() - t0}


class RuntimeImpl:
    """A quantized folder on the native runtime (osengine::runtime): one context with a sequence per batch row."""

    def __init__(self, folder: str, threads: int, n_ctx: int, max_batch: int, quantize_embeddings: bool):
        from ..runtime.native import load_native

        self.model = load_native(folder, quantize_embeddings=quantize_embeddings)
        self.threads, self.n_ctx = threads, n_ctx
        self.context = self.model.context(n_ctx=n_ctx, n_batch=512, n_threads=threads, n_seq=max_batch)
        self.nbytes = self.model.nbytes
        self.bytes_per_token = self.model._model.bytes_per_token

    def prefill(self, ids: np.ndarray) -> float:
        self.context.kv_clear()
        t0 = time.perf_counter()
        for seq, row in enumerate(ids):
            self.context.decode(row, seq=seq)
        return (time.perf_counter() - t0) * 1e3

    def decode(self, prompt: np.ndarray, new_tokens: int) -> float:
        self.context.kv_clear()
        seqs = list(range(len(prompt)))
        nxt = [int(self.context.decode(row, seq=seq)[0].argmax()) for seq, row in enumerate(prompt)]
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = self.context.decode_batch(nxt, seqs).argmax(axis=1).tolist()
        return (time.perf_counter() - t0) * 1e3

    def perplexity(self, windows: np.ndarray) -> dict:
        context = self.model.context(n_ctx=windows.shape[1], n_batch=512, n_threads=self.threads)

        def logits(window):
            context.kv_clear()
            return context.decode(window, all_logits=True)
        return perplexity_from(logits, windows)


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ImportError("the llamacpp-* impls need llama-cpp-python: pip install \"osengine[llamacpp]\" (builds "
                          "llama.cpp from source, ~10 minutes)") from None
    return llama_cpp


def make_gguf(source_gguf: str, kind: str, out_dir: str) -> str:
    """`source_gguf` requantized to `kind` (q8_0, q4_0, f32) with llama.cpp's own quantize API, cached in out_dir."""
    llama_cpp = _llama_cpp()
    ftype = next(code for name, code in LLAMACPP_IMPLS.values() if name == kind)
    out = Path(out_dir) / f"{Path(source_gguf).stem}.{kind}.gguf"
    if out.is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    tmp = out.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(source_gguf).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source_gguf} to {kind}")
    tmp.rename(out)
    return str(out)


class LlamaCppImpl:
    """A GGUF on llama.cpp through llama-cpp-python's bindings of its C API (llama_decode over a llama_batch with one
    sequence per batch row; its default KV cache type and attention)."""

    def __init__(self, gguf: str, threads: int, n_ctx: int, max_batch: int):
        ll = self.ll = _llama_cpp()
        ll.llama_backend_init()
        # quiet; the callback must outlive every call that may log (llama.cpp keeps the pointer)
        self._log_callback = ll.llama_log_callback(lambda level, text, user: None)
        ll.llama_log_set(self._log_callback, None)
        model_params = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(gguf.encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.threads, self.max_batch = threads, max_batch
        self.ctx = self._context(n_ctx, max_batch)
        self.batch = ll.llama_batch_init(max(512, max_batch), 0, max_batch)
        self.nbytes = int(ll.llama_model_size(self.model))
        self.bytes_per_token = self.nbytes - self._embedding_bytes()

    def _embedding_bytes(self) -> int:
        # a tied model's token_embd is lm_head (read whole per token); only an untied table is read one row at a time
        return 0

    def _context(self, n_ctx: int, n_seq: int):
        ll = self.ll
        params = ll.llama_context_default_params()
        params.n_ctx = n_ctx * n_seq
        params.n_batch = 512
        params.n_ubatch = 512
        params.n_seq_max = n_seq
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        ctx = ll.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        return ctx

    def _clear(self, ctx) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(ctx), True)

    def _run(self, ctx, tokens, positions, seqs, want_logits) -> None:
        """One llama_decode of len(tokens) <= 512 tokens."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (t, p, s, w) in enumerate(zip(tokens, positions, seqs, want_logits)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, w
            b.seq_id[i][0] = s
        if self.ll.llama_decode(ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _logits(self, ctx, i: int) -> np.ndarray:
        ptr = self.ll.llama_get_logits_ith(ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _prefill_row(self, ctx, row, seq: int, all_logits: bool = False):
        out = []
        for start in range(0, len(row), 512):
            chunk = [int(t) for t in row[start:start + 512]]
            last = start + len(chunk) == len(row)
            flags = [all_logits or (last and i == len(chunk) - 1) for i in range(len(chunk))]
            self._run(ctx, chunk, range(start, start + len(chunk)), [seq] * len(chunk), flags)
            if all_logits:
                out.extend(self._logits(ctx, i) for i in range(len(chunk)))
        return np.stack(out) if all_logits else self._logits(ctx, -1)

    def prefill(self, ids: np.ndarray) -> float:
        self._clear(self.ctx)
        t0 = time.perf_counter()
        for seq, row in enumerate(ids):
            self._prefill_row(self.ctx, row, seq)
        return (time.perf_counter() - t0) * 1e3

    def decode(self, prompt: np.ndarray, new_tokens: int) -> float:
        self._clear(self.ctx)
        n = len(prompt)
        nxt = [int(self._prefill_row(self.ctx, row, seq).argmax()) for seq, row in enumerate(prompt)]
        pos = [len(row) for row in prompt]
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            self._run(self.ctx, nxt, pos, range(n), [True] * n)
            nxt = [int(self._logits(self.ctx, i).argmax()) for i in range(n)]
            pos = [p + 1 for p in pos]
        return (time.perf_counter() - t0) * 1e3

    def perplexity(self, windows: np.ndarray) -> dict:
        def logits(window):
            self._clear(self.ctx)
            return self._prefill_row(self.ctx, window, 0, all_logits=True)
        return perplexity_from(logits, windows)
