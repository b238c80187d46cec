"""Shared by every test folder: the tests directory on sys.path (appended, so the standard library and the installed
packages win) for the shared helper `tiny_models`, and torch kept to the machine's two threads."""
import os
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).parent))

try:
    import torch
except ImportError:  # the engine tests need numpy only
    torch = None
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tokens():
    """Calibration token ids for the tiny models (vocabulary 128)."""
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
