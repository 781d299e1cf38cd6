"""Device targets of a build: what each adds to an artifact (base.py), one module per device."""

# `llmc build --target` choices; here, without importing torch, so that the command line lists them.
TARGET_NAMES = ("cpu", "onnx")
