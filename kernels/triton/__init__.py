"""The GPU's kernels, written in Triton (their tests run under TRITON_INTERPRET=1 without a GPU)."""
