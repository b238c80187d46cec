"""osengine: Outlier Suppression+ quantization of transformer language models, with an int8 / int4 engine.

The engine's ops (numpy arrays or torch tensors, no copies) are available at the top level; the quantization front
end (`quantize`, `train_qat`, `evaluate`, `load_model`, `load`, `find_outlier_tokens`) and the native runtime
(`load_native`) are imported lazily so that `import osengine` stays light.
"""
from __future__ import annotations

from ._C import __version__
from .engine.ops import (
    PackedWeights,
    QuantizedActivations,
    best_cpu_backend,
    code_range,
    column_sums,
    cpu_has_avx2,
    cpu_has_avx512_vnni,
    gemm,
    gemm_accumulate,
    gemm_w4a4,
    get_num_threads,
    pack_int4,
    pack_weights,
    registered_backends,
    set_num_threads,
    unpack_int4,
)
from .engine.ops import quantize as quantize_activations

_FRONT_END = {"quantize": "api", "train_qat": "api", "evaluate": "api", "load_model": "api", "load": "api",
              "find_outlier_tokens": "api", "load_native": "runtime.native"}


def __getattr__(name: str):
    module = _FRONT_END.get(name)
    if module is None:
        raise AttributeError(f"module 'osengine' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "__version__",
    "PackedWeights",
    "QuantizedActivations",
    "best_cpu_backend",
    "code_range",
    "column_sums",
    "cpu_has_avx2",
    "cpu_has_avx512_vnni",
    "gemm",
    "gemm_accumulate",
    "gemm_w4a4",
    "get_num_threads",
    "pack_int4",
    "pack_weights",
    "quantize_activations",
    "registered_backends",
    "set_num_threads",
    "unpack_int4",
    "quantize",
    "evaluate",
    "load_model",
    "load",
    "find_outlier_tokens",
    "load_native",
]
