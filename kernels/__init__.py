"""Compute kernels, one folder per device (`cpu/`, `triton/`). Each has a plain-torch reference
beside its fast paths (the formats' own in llmc.quant); tests compare them."""
