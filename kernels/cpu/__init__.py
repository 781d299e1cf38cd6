"""The CPU's kernels: llmc's C++ library (its sources, compiler and loader) and the torch-op matmuls
over GGML blocks and over float16 / bfloat16 weights that the CPU runs."""
