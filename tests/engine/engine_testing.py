"""Shared helpers of the engine tests."""
import numpy as np

import osengine

# The optimized CPU backends this machine can run; each is compared with the scalar reference.
OPTIMIZED_BACKENDS = ["avx2"] if osengine.cpu_has_avx2() else []


def activations(rng, m, k, outliers=True):
    """Normal activations with a few large, asymmetric outlier channels, as in real LLMs."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    if outliers and k >= 4:
        channels = rng.choice(k, size=max(1, k // 64), replace=False)
        x[:, channels] = x[:, channels] * 20.0 + 15.0
    return x
