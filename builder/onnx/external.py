"""ONNX initializers written to one external-data file as they are made, never all in memory.

onnx.save_model's external-data path serializes a model whose tensors are all in memory first; a
graph over a multi-GB model would then hold every weight twice. Here each initializer is appended
to the data file when the graph builder makes it, and the graph keeps only its location.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import helper

# Each tensor starts on a page boundary, so that onnxruntime may memory-map it in place.
ALIGNMENT = 4096
# Smaller tensors (shapes, scalars, norm weights of tiny models) stay inside the graph file.
INLINE_MAX_BYTES = 1024


class ExternalData:
    """Appends tensors to `path` (named in the graph relative to the graph file: `location`)."""

    def __init__(self, path: Path, location: str) -> None:
        self.location = location
        self._file: BinaryIO = path.open("wb")
        self._offset = 0

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """An initializer called `name` holding `array`: external above INLINE_MAX_BYTES."""
        array = np.ascontiguousarray(array)
        if array.nbytes <= INLINE_MAX_BYTES:
            return onnx.numpy_helper.from_array(array, name)
        pad = -self._offset % ALIGNMENT
        if pad:
            self._write(b"\0" * pad)
        offset = self._offset
        self._write(array.tobytes())
        proto = onnx.TensorProto()
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        proto.dims.extend(array.shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._offset += len(data)

    @property
    def size(self) -> int:
        return self._offset

    def close(self) -> None:
        self._file.close()
