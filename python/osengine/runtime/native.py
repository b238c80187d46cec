"""The native runtime (osengine::runtime, C++): a quantized folder (format version 2, as `osengine quantize --out`
writes it) loaded and run without transformers or torch. The forward pass of the LLaMA family (llama, mistral,
qwen2) runs on the engine's ops with the Python engine's fusions (q/k/v and gate/up as one GEMM each, the RMSNorm
and the SiLU gate inside the activation quantization, the residual in the GEMM epilogue) over a preallocated KV
cache; layers the recipe keeps in floating point run in fp32.

    model = load_native("smollm2-w8a8")
    context = model.context(n_ctx=2048)
    logits = context.decode(token_ids)                  # [1, n_vocab], the last token's
    new_tokens = context.generate(prompt_ids, max_new_tokens=64)

Token ids in and out; NativeTokenizer turns text into ids and back in C++ from a Hugging Face tokenizer.json, with
the ids of the transformers fast tokenizer (the BPE families the runtime runs; docs/runtime.md, "Tokenizer"):

    tokenizer = load_native_tokenizer("path/to/tokenizer.json")   # or the folder holding it
    ids = tokenizer.encode("Hello")                                 # with the BOS where the file's template adds one
    text = tokenizer.decode(ids, skip_special_tokens=True)

Text in and out, streamed (`osengine run`), and perplexity on the runtime (`osengine eval --runtime`):

    text = generate("smollm2-w8a8", "The history of the city", max_new_tokens=64,
                    on_text=lambda piece: print(piece, end="", flush=True))
    result = perplexity("smollm2-w8a8", open("wiki.test.raw").read(), seq_len=512, max_windows=16)

Decoding releases the GIL: contexts on one model can run in parallel threads.
"""
from __future__ import annotations

import codecs
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .. import _C


class NativeRuntimeUnavailable(RuntimeError):
    """This osengine was built without the native runtime."""


BUILD_HINT = ("build it with the CMake option OSENGINE_RUNTIME=ON (the default AUTO builds it when its dependencies "
              "are found): install nlohmann/json and PCRE2 (apt-get install nlohmann-json3-dev libpcre2-dev "
              "pkg-config), then reinstall osengine (pip install .)")


def _require_runtime() -> None:
    if not _C.has_native_runtime():
        raise NativeRuntimeUnavailable(f"this osengine was built without the native runtime; {BUILD_HINT}")


LoadError = _C.RuntimeLoadError if hasattr(_C, "RuntimeLoadError") else ValueError


class NativeContext:
    """A KV cache and scratch buffers for n_seq sequences (default one) on a NativeModel (one caller thread at a
    time)."""

    def __init__(self, model: "NativeModel", n_ctx: int = 2048, n_batch: int = 512, n_threads: int = 0,
                 n_seq: int = 1):
        self.model = model
        self._n_ctx = n_ctx
        self._context = _C.RuntimeContext(model._model, n_ctx, n_batch, n_threads, n_seq)

    def decode(self, tokens: Sequence[int], all_logits: bool = False, seq: int = 0) -> np.ndarray:
        """Run `tokens` after sequence `seq`'s cached ones; the float32 logits [1, n_vocab] of the last token
        ([n, n_vocab] of every token with all_logits)."""
        return self._context.decode(np.asarray(tokens, dtype=np.int64).reshape(-1), all_logits, seq)

    def decode_batch(self, tokens: Sequence[int], seqs: Sequence[int]) -> np.ndarray:
        """One token for each of several different sequences (tokens[i] after sequence seqs[i]'s cached ones) in
        one forward pass, which reads the weights once for all: the logits [n, n_vocab]."""
        return self._context.decode_batch(np.asarray(tokens, dtype=np.int64).reshape(-1), [int(s) for s in seqs])

    @property
    def n_past(self) -> int:
        """Positions cached for sequence 0 (n_past_of(seq) for the others)."""
        return self._context.n_past

    def n_past_of(self, seq: int) -> int:
        return self._context.n_past_of(seq)

    def kv_clear(self, seq: int = -1) -> None:
        """Forget sequence `seq`'s cache (-1: every sequence's)."""
        self._context.kv_clear(seq)

    def kv_truncate(self, pos: int, seq: int = 0) -> None:
        """Forget every position of sequence `seq` from `pos` on; decoding goes on from there."""
        self._context.kv_truncate(pos, seq)

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def generate(self, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, on_token: Optional[Callable[[int], Optional[bool]]] = None) -> list:
        """Decode `prompt` after the cached tokens, then up to `max_new_tokens` tokens (greedy at temperature 0,
        else sampled with top_k / top_p from `seed`); stops after the end-of-sequence token. on_token(id) is called
        with each new token as soon as it is chosen (return False to stop there). Returns the new ids."""
        return _C.runtime_generate(self._context, np.asarray(prompt, dtype=np.int64).reshape(-1), max_new_tokens,
                                   temperature, top_k, top_p, seed, on_token)


class NativeModel:
    """A quantized folder loaded by the native runtime: weights packed once, immutable, shareable by contexts."""

    def __init__(self, directory: str | os.PathLike, *, quantize_embeddings: bool = False):
        _require_runtime()
        self.directory = os.fspath(directory)
        self.load_options = {"quantize_embeddings": quantize_embeddings}
        self._model = _C.RuntimeModel.load(self.directory, quantize_embeddings=quantize_embeddings)
        self.info = self._model.info
        self._tokenizer = None

    @property
    def tokenizer(self) -> "NativeTokenizer":
        """The folder's tokenizer.json, read by the native tokenizer (loaded on first use). LoadError when the folder
        has none."""
        if self._tokenizer is None:
            path = os.path.join(self.directory, "tokenizer.json")
            if not os.path.isfile(path):
                raise LoadError(f"{self.directory}: there is no tokenizer.json in the folder (the native runtime reads "
                                f"text through a Hugging Face fast tokenizer's tokenizer.json; give token ids instead)")
            self._tokenizer = NativeTokenizer(path)
        return self._tokenizer

    @property
    def nbytes(self) -> int:
        """Bytes of the loaded weights (packed GEMM layouts and floating-point tensors)."""
        return self._model.nbytes

    def context(self, n_ctx: int = 2048, n_batch: int = 512, n_threads: int = 0, n_seq: int = 1) -> NativeContext:
        return NativeContext(self, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, n_seq=n_seq)


def load_native(directory: str | os.PathLike, *, quantize_embeddings: bool = False) -> NativeModel:
    """Load a quantized folder into the native runtime. A folder it cannot run (missing, truncated or corrupt files,
    a newer or older format version, an architecture or scheme it does not run) raises LoadError, a ValueError that
    names the folder and the problem.

    quantize_embeddings  run lm_head on the engine (int8 weights per channel, int8 activations per token) and keep the
                         embedding table in int8, as convert_to_engine(quantize_embeddings=True) does: lm_head reads a
                         quarter of the bytes (faster decoding) at a small accuracy cost; off: the recipe as saved.
    """
    return NativeModel(directory, quantize_embeddings=quantize_embeddings)


class NativeTokenizer:
    """A tokenizer.json read by the native runtime: encode / decode in C++, the ids of transformers' fast tokenizer.
    A file it cannot read, or a component it does not support (named in the message), raises LoadError."""

    def __init__(self, path: str | os.PathLike):
        _require_runtime()
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self._tokenizer = _C.RuntimeTokenizer.from_file(path)

    def encode(self, text: str | bytes, add_special_tokens: bool = True) -> list:
        """Token ids of `text` (bytes that are not valid UTF-8 are read as bytes.decode("utf-8", "replace"))."""
        return self._tokenizer.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids` (transformers' decode with clean_up_tokenization_spaces=False)."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens)

    def is_special(self, id: int) -> bool:
        """Whether `id` is a special added token (BOS, EOS, chat markers: skipped by decode(skip_special_tokens))."""
        return self._tokenizer.is_special(id)

    def token_to_piece(self, id: int) -> bytes:
        """The bytes of one token, for streaming: possibly part of a UTF-8 character (keep incomplete bytes until
        the next pieces complete them)."""
        return self._tokenizer.token_to_piece(id)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        """The BOS the file's post-processor adds, None when it adds none (then see the model's config)."""
        bos = self._tokenizer.bos_token_id
        return None if bos < 0 else bos


def load_native_tokenizer(path: str | os.PathLike) -> NativeTokenizer:
    """A tokenizer.json (or a folder holding one) loaded by the native runtime's tokenizer."""
    return NativeTokenizer(path)



ModelLike = Union[str, os.PathLike, NativeModel]


def _as_model(model: Union[ModelLike, NativeContext], **load_options) -> NativeModel:
    if isinstance(model, NativeContext):
        return model.model
    if isinstance(model, NativeModel):
        if load_options:
            raise ValueError("load options apply to a folder, not to a NativeModel already loaded")
        return model
    return load_native(model, **load_options)


class TextStream:
    """Token ids to text, piece by piece, for streaming: each piece holds only whole UTF-8 characters (a byte-level
    BPE or byte-fallback token can carry part of one: its bytes wait for the next tokens); special tokens (EOS, chat
    markers) add nothing. Bytes that cannot become valid UTF-8 read as U+FFFD, as decode does."""

    def __init__(self, tokenizer: NativeTokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id: int) -> str:
        """The new complete text after token `id` ('' while a character is incomplete)."""
        if self.tokenizer.is_special(id):
            return ""
        return self._decoder.decode(self.tokenizer.token_to_piece(id))

    def flush(self) -> str:
        """What is still held back at the end (incomplete bytes, as U+FFFD)."""
        return self._decoder.decode(b"", final=True)


@dataclass
class Generation:
    """What generate_with_stats returns: the text and ids, and where the time went."""
    text: str
    prompt_tokens: list = field(default_factory=list)
    new_tokens: list = field(default_factory=list)
    prefill_seconds: float = 0.0    # decoding the prompt and choosing the first new token
    decode_seconds: float = 0.0     # every later token

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second after the first (each one decode step); nan with fewer than two new tokens."""
        steps = len(self.new_tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else math.nan


def generate_with_stats(model: Union[ModelLike, NativeContext], prompt: Union[str, Sequence[int]],
                        max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                        seed: int = 0, on_text: Optional[Callable[[str], object]] = None,
                        tokenizer: Optional[NativeTokenizer] = None, n_ctx: Optional[int] = None, n_threads: int = 0,
                        **load_options) -> Generation:
    """generate(), returning a Generation (text, prompt and new ids, prefill and decode times)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    native = _as_model(model, **load_options)
    tokenizer = tokenizer or native.tokenizer
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("generate: the prompt gives no tokens (give some text, or token ids)")
    if isinstance(model, NativeContext):
        context = model
        free = context.n_ctx - context.n_past
        if len(ids) + max_new_tokens - 1 > free:
            raise ValueError(f"generate: {len(ids)} prompt tokens and {max_new_tokens} new ones do not fit the "
                             f"context ({free} of n_ctx = {context.n_ctx} positions left)")
    else:
        needed = len(ids) + max_new_tokens
        if n_ctx is not None and n_ctx < needed - 1:
            raise ValueError(f"generate: {len(ids)} prompt tokens and {max_new_tokens} new ones do not fit "
                             f"n_ctx = {n_ctx}")
        context = native.context(n_ctx=n_ctx or needed, n_threads=n_threads)
    stream = TextStream(tokenizer)
    pieces, times = [], []

    def on_token(id: int) -> bool:
        times.append(time.perf_counter())
        piece = stream.push(id)
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        return True

    t0 = time.perf_counter()
    new = context.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           on_token=on_token)
    t1 = time.perf_counter()
    tail = stream.flush()
    if tail:
        pieces.append(tail)
        if on_text is not None:
            on_text(tail)
    first = times[0] if times else t1
    return Generation(text="".join(pieces), prompt_tokens=ids, new_tokens=list(new), prefill_seconds=first - t0,
                      decode_seconds=(times[-1] if times else t1) - first)


def generate(model: Union[ModelLike, NativeContext], prompt: Union[str, Sequence[int]], max_new_tokens: int = 64,
             *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             on_text: Optional[Callable[[str], object]] = None, tokenizer: Optional[NativeTokenizer] = None,
             n_ctx: Optional[int] = None, n_threads: int = 0, **load_options) -> str:
    """Continue `prompt` on the native runtime and return the new text.

    model     a quantized folder (loaded with `load_options`), a NativeModel (a new context of n_ctx positions,
              default: just enough) or a NativeContext (goes on after its cached tokens)
    prompt    text (tokenized by the folder's tokenizer.json, with the BOS its template adds) or token ids
    sampling  greedy at temperature 0, else temperature / top_k / top_p from `seed` (the runtime's Sampler)
    on_text   called with each piece of new text as it is decoded; the pieces hold whole UTF-8 characters only and
              skip special tokens (EOS); their concatenation is the returned text
    Stops after max_new_tokens or the end-of-sequence token. The text is the continuation as it reads after the
    prompt (for byte-level BPEs tokenizer.decode(new_ids, skip_special_tokens=True); a SentencePiece decoder's
    decode would drop the continuation's leading space, the stream keeps it)."""
    return generate_with_stats(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, on_text=on_text, tokenizer=tokenizer, n_ctx=n_ctx, n_threads=n_threads,
                               **load_options).text


def _window_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over rows of -log softmax(logits[i])[targets[i]], in float64 (the float32 logits as they are)."""
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def perplexity(model: ModelLike, text: str, seq_len: int = 512, max_windows: Optional[int] = 16, *,
               n_threads: int = 0, tokenizer: Optional[NativeTokenizer] = None,
               on_window: Optional[Callable[[int, int], object]] = None, **load_options) -> dict:
    """Perplexity of the native runtime on `text`: exp(mean NLL) of the next-token predictions inside the first
    `max_windows` (all when None) non-overlapping windows of `seq_len` tokens, each decoded from an empty KV cache
    with every position's logits. The conventions of osengine.evaluation.perplexity (`osengine eval --ppl`, with or
    without --engine), so the numbers compare: the text tokenized as one string without special tokens, windows
    cut from its start, the tokens past the last whole window dropped, seq_len - 1 predictions per window. Returns
    {"perplexity", "nll", "windows", "seq_len", "tokens", "seconds"} like it. on_window(i, n) after each window."""
    if not isinstance(text, str):
        raise TypeError(f"perplexity: text must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError("perplexity: the text is empty")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"perplexity: seq_len must be an integer of at least 2, got {seq_len!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"perplexity: max_windows must be a positive integer or None, got {max_windows!r}")
    native = _as_model(model, **load_options)
    tokenizer = tokenizer or native.tokenizer
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    available = len(ids) // seq_len
    if available == 0:
        raise ValueError(f"perplexity: the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    n = available if max_windows is None else min(max_windows, available)
    context = native.context(n_ctx=seq_len, n_batch=min(seq_len, 512), n_threads=n_threads)
    nll, count, t0 = 0.0, 0, time.time()
    for w in range(n):
        window = ids[w * seq_len:(w + 1) * seq_len]
        context.kv_clear()
        logits = context.decode(window, all_logits=True)
        finite = np.isfinite(logits).all(axis=1)
        if not finite.all():
            position = int(np.argmin(finite))
            raise ValueError(f"perplexity: the runtime's logits are not finite (NaN or inf) in window {w} at position "
                             f"{position} (token {int(window[position])}): the folder's weights or scales are broken")
        nll += _window_nll(logits[:-1], window[1:])
        count += seq_len - 1
        if on_window is not None:
            on_window(w + 1, n)
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "windows": n, "seq_len": seq_len, "tokens": count,
            "seconds": time.time() - t0}
