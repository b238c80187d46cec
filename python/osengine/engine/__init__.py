"""The engine from Python: the private extension osengine._C behind numpy- and torch-friendly ops (no torch needed)."""
