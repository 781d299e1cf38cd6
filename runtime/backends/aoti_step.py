"""The artifact's ahead-of-time compiled decode step, an AOTInductor package: the CPU's
executor of a bucketed step (runtime/bucketed_step.py pads and validates its inputs).

Loading never compiles anything: the package's code is mapped with torch's C++ loader (Python's
`aoti_load_package` spends seconds importing and probing), and its weights are the eager model's
own tensors, handed over by name. Whether this process can run a package at all (torch version,
CPU capability, kernel library) is the backend's check before loading (runtime/backends/cpu.py).
The package and its constants are loaded from the bytes whose sha256 was checked (a private copy).

AOTInductor does not check the shapes or index ranges of what it is given: BucketedStep
validates every input first, as a bad slot or block id would otherwise corrupt memory.
"""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors.torch import load

from llmc.artifacts.manifest import CompiledStep
from llmc.artifacts.reader import Artifact
from llmc.logs import get_logger
from llmc.model.decode_step import DecodeStep
from llmc.runtime.bucketed_step import BucketedStep

log = get_logger("llmc.compiled")

_MODEL_NAME = "model"  # the name aoti_compile_and_package gives the one model in a package
_RUN_SINGLE_THREADED = False  # the engine calls from one thread at a time either way
_NUM_RUNNERS = 1
_CPU_DEVICE_INDEX = -1
_PACKAGE_NAME = "decode.pt2"  # the private copy's name: torch's loader wants a .pt2 file


def _load_package(package: bytes) -> torch._C._aoti.AOTIModelPackageLoader:
    """Load a .pt2 package from these (verified) bytes: written to a fresh file in a fresh 0700
    directory of our own (torch's loader takes a path), removed once the loader has unpacked it."""
    with tempfile.TemporaryDirectory(prefix="llmc-package-") as private:
        path = os.path.join(private, _PACKAGE_NAME)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(package)
        return torch._C._aoti.AOTIModelPackageLoader(
            path, _MODEL_NAME, _RUN_SINGLE_THREADED, _NUM_RUNNERS, _CPU_DEVICE_INDEX
        )


class AOTInductorStep(BucketedStep):
    """A loaded package; see BucketedStep for how to call it."""

    def __init__(self, info: CompiledStep, loader: torch._C._aoti.AOTIModelPackageLoader, num_slots: int) -> None:
        super().__init__(info, num_slots)
        self._loader = loader

    @classmethod
    def load(cls, artifact: Artifact, info: CompiledStep, step: DecodeStep, num_slots: int) -> AOTInductorStep | None:
        """The loaded step, or None (with a warning) when the package lacks constants it needs."""
        loader = _load_package(artifact.read_verified(info.package))
        tensors: dict[str, torch.Tensor] = dict(step.named_parameters(remove_duplicate=False))
        tensors |= dict(step.named_buffers(remove_duplicate=False))
        tensors |= load(artifact.read_verified(info.constants))
        wanted = loader.get_constant_fqns()
        missing = [name for name in wanted if name not in tensors]
        if missing:
            log.warning("compiled.not_used", kind=info.kind, reason="constants missing", missing=missing[:5])
            return None
        # user_managed: the package uses our tensors in place (memory-mapped weights are not copied).
        loader.load_constants({name: tensors[name] for name in wanted}, False, True, True)
        log.info("compiled.loaded", kind=info.kind, buckets=info.buckets, max_seq_len=info.max_seq_len)
        return cls(info, loader, num_slots)

    def _run(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        out: list[torch.Tensor] = self._loader.run(inputs)
        return out[0]
