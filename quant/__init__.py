"""The GGML block formats and their reference codecs: part of the artifact contract.

The bottom floor: `formats` (the format table, read by `llmc inspect` without torch), the codecs
(`legacy`, `kquants`: quantizers byte-identical to llama.cpp's, and the plain-torch dequantizers
every device's kernels are tested against). Nothing here imports the builder, the runtime or the
kernels.
"""
