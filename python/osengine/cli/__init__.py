"""The `osengine` command line (main.py) and its end-to-end benchmark (bench.py)."""
from .main import main

__all__ = ["main"]
