"""Compute kernels. Each has a plain-torch reference beside its fast paths; tests compare them."""
