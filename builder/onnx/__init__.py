"""The ONNX target's graph (issue #26): a decoder written with the `onnx` package for onnxruntime.

`nbits` maps GGML blocks onto `com.microsoft.MatMulNBits` without requantizing, `external` writes
the weights beside the graph as ONNX external data, `graph` writes the model, and
builder/targets/onnx.py adds both to an artifact.
"""
