"""Shared helpers of the engine tests."""
import numpy as np

import osengine

# Every registered backend this machine runs on CPU data but the reference (the table in cpp/src/backends/registry.cpp):
# each is compared with the scalar reference, so a new backend is tested by being registered.
OPTIMIZED_BACKENDS = [name for name in osengine.registered_backends() if name not in ("reference", "cuda")]


def activations(rng, m, k, outliers=True):
    """Normal activations with a few large, asymmetric outlier channels, as in real LLMs."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    if outliers and k >= 4:
        channels = rng.choice(k, size=max(1, k // 64), replace=False)
        x[:, channels] = x[:, channels] * 20.0 + 15.0
    return x
