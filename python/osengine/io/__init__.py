"""Models in and out: floating-point sources (HF folder, GGUF, packaged names), the quantized checkpoint, exports."""
