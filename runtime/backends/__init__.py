"""Device backends (runtime/backends/base.py): one module per device, registered here by name."""

from __future__ import annotations

from llmc.errors import BadInputError
from llmc.runtime.backends.base import Backend, BackendOptions
from llmc.runtime.backends.cpu import CpuBackend

BACKENDS: dict[str, type[Backend]] = {CpuBackend.name: CpuBackend}


def make_backend(device: str, options: BackendOptions) -> Backend:
    """The backend of `device`, or a BadInputError naming the devices there are."""
    backend = BACKENDS.get(device)
    if backend is None:
        raise BadInputError(f"no backend for device {device!r}; this runtime has: {', '.join(BACKENDS)}")
    return backend(options)
