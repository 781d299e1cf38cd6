"""The CPU's kernels: llmc's C++ library (its sources, compiler and loader) and the torch-op matmuls
over GGML blocks that the CPU runs."""
