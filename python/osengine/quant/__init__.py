"""What a quantized tensor is: quantizer specs and primitives, observers, fake-quantized layers, recipes, GPTQ rounding,
and the engine's integer-exact arithmetic in torch."""
