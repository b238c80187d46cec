"""Stable import path of the engine's ops (moved to osengine.engine.ops); kept for existing code."""
from .engine.ops import *  # noqa: F401,F403
from .engine.ops import __all__  # noqa: F401
