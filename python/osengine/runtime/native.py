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

Decoding releases the GIL: contexts on one model can run in parallel threads.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .. import _C


class NativeRuntimeUnavailable(RuntimeError):
    """This osengine was built without the native runtime."""


def _require_runtime() -> None:
    if not _C.has_native_runtime():
        raise NativeRuntimeUnavailable(
            "this osengine was built without the native runtime (nlohmann/json or PCRE2 was not found at build time: "
            "apt-get install nlohmann-json3-dev libpcre2-dev pkg-config, then reinstall osengine)")


class NativeContext:
    """A KV cache and scratch buffers for n_seq sequences (default one) on a NativeModel (one caller thread at a
    time)."""

    def __init__(self, model: "NativeModel", n_ctx: int = 2048, n_batch: int = 512, n_threads: int = 0,
                 n_seq: int = 1):
        self.model = model
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

    def generate(self, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0) -> list:
        """Decode `prompt` after the cached tokens, then up to `max_new_tokens` tokens (greedy at temperature 0,
        else sampled with top_k / top_p from `seed`); stops after the end-of-sequence token. Returns the new ids."""
        return _C.runtime_generate(self._context, np.asarray(prompt, dtype=np.int64).reshape(-1), max_new_tokens,
                                   temperature, top_k, top_p, seed)


class NativeModel:
    """A quantized folder loaded by the native runtime: weights packed once, immutable, shareable by contexts."""

    def __init__(self, directory: str | os.PathLike, *, quantize_embeddings: bool = False):
        _require_runtime()
        self._model = _C.RuntimeModel.load(os.fspath(directory), quantize_embeddings=quantize_embeddings)
        self.info = self._model.info

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


LoadError = _C.RuntimeLoadError if hasattr(_C, "RuntimeLoadError") else ValueError
