"""Training stages: quantization-aware training (qat.py)."""
