"""The engine-backed model: linears on the engine, fusion and folded prologues, int8 embeddings, memory, the
conversion from a fake-quant model (convert.py, on top), and the simulation of the folded prologues. The native
runtime (C++, no torch) through native.py: load_native, generate, perplexity, re-exported here."""
from .native import (
    Generation,
    LoadError,
    NativeContext,
    NativeModel,
    NativeRuntimeUnavailable,
    NativeTokenizer,
    TextStream,
    generate,
    generate_with_stats,
    load_native,
    load_native_tokenizer,
    perplexity,
)

__all__ = ["Generation", "LoadError", "NativeContext", "NativeModel", "NativeRuntimeUnavailable", "NativeTokenizer",
           "TextStream", "generate", "generate_with_stats", "load_native", "load_native_tokenizer", "perplexity"]
