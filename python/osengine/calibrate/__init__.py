"""Calibration: data, the block-by-block pipeline as named steps, folding, clipping search, GPTQ Hessians, report."""
