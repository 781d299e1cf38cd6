"""Device backends (runtime/backends/base.py): one module per device, registered here by name.

The registry names each backend's class as "module:Class" and imports only the one asked for, so
importing this package imports no torch: the onnx backend serves in an install without it."""

from __future__ import annotations

import importlib

from llmc.errors import BadInputError
from llmc.runtime.backends.base import Backend, BackendOptions

__all__ = ["BACKENDS", "Backend", "BackendOptions", "make_backend"]

BACKENDS: dict[str, str] = {
    "cpu": "llmc.runtime.backends.cpu:CpuBackend",
    "onnx": "llmc.runtime.backends.onnx:OnnxBackend",
}
# The optional dependencies a backend may lack, with the extra that installs each.
_EXTRAS = {"torch": "torch", "safetensors": "torch", "onnxruntime": "lean"}


def make_backend(device: str, options: BackendOptions) -> Backend:
    """The backend of `device`, or a BadInputError naming the devices there are, or saying what to
    install where this environment lacks the backend's dependencies."""
    target = BACKENDS.get(device)
    if target is None:
        raise BadInputError(f"no backend for device {device!r}; this runtime has: {', '.join(BACKENDS)}")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # ModuleNotFoundError, or a dependency whose own import fails
        missing = (exc.name or "").split(".")[0]
        if missing in _EXTRAS:
            raise BadInputError(
                f"the {device} backend needs {missing}, which is not installed here: "
                f"pip install 'llmc[{_EXTRAS[missing]}]'"
            ) from exc
        if exc.name == module_name:
            raise BadInputError(
                f"this llmc install has no {device} backend ({module_name} is missing); "
                "install a release of llmc that has it"
            ) from exc
        raise
    backend: type[Backend] = getattr(module, class_name)
    return backend(options)
