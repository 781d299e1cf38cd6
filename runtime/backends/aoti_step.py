"""The artifact's ahead-of-time compiled decode step, loaded for this process.

Loading never compiles anything: the package's code is mapped with torch's C++ loader (Python's
`aoti_load_package` spends seconds importing and probing), and its weights are the eager model's
own tensors, handed over by name. A package built for another torch or another CPU capability is
not loaded at all (a wrong-ISA kernel would crash the process): the runtime warns and runs eagerly.
The package and its constants are loaded from the bytes whose sha256 was checked (a private copy).

AOTInductor does not check the shapes or index ranges of what it is given, so `__call__`
validates every input first: a bad slot or block id would otherwise corrupt memory.
"""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors.torch import load

from llmc.artifacts.manifest import CompiledStep
from llmc.artifacts.reader import Artifact
from llmc.errors import InternalError
from llmc.logs import get_logger
from llmc.runtime.decode_step import DecodeStep

log = get_logger("llmc.compiled")

_MODEL_NAME = "model"  # the name aoti_compile_and_package gives the one model in a package
_RUN_SINGLE_THREADED = False  # the engine calls from one thread at a time either way
_NUM_RUNNERS = 1
_CPU_DEVICE_INDEX = -1
_PACKAGE_NAME = "decode.pt2"  # the private copy's name: torch's loader wants a .pt2 file


def incompatibility(info: CompiledStep, block_size: int, cpu_kernels: bool = False) -> str | None:
    """Why this process cannot run the compiled step, or None when it can; `cpu_kernels`: the model
    computes with the artifact's CPU kernel library."""
    torch_version = torch.__version__.split("+")[0]
    if info.target != "cpu":
        return f"it targets {info.target}; this runtime runs on the cpu"
    if info.torch_version != torch_version:
        return f"it was compiled with torch {info.torch_version}, this is torch {torch_version}; rebuild the artifact"
    capability = torch.backends.cpu.get_cpu_capability()
    if info.cpu_capability != capability:
        return f"it was compiled for a {info.cpu_capability} CPU, this one is {capability}; rebuild it here"
    if info.block_size != block_size:
        return f"it was traced for KV blocks of {info.block_size} tokens, the engine uses {block_size}"
    if info.cpu_kernels and not cpu_kernels:
        return "it calls the artifact's CPU kernels, which this process runs without (see the warning before)"
    return None


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


class CompiledDecode:
    """Call with the decode step's inputs (see DecodeStep.forward) for [B, vocab] float32 logits."""

    def __init__(self, info: CompiledStep, loader: torch._C._aoti.AOTIModelPackageLoader, num_slots: int) -> None:
        self.info = info
        self.buckets = info.buckets
        self.max_batch = info.buckets[-1]
        self.max_blocks = info.max_seq_len // info.block_size
        self._loader = loader
        self._num_slots = num_slots
        self.calls = 0  # steps this package ran

    @classmethod
    def load(cls, artifact: Artifact, info: CompiledStep, step: DecodeStep, num_slots: int) -> CompiledDecode | None:
        """The loaded step, or None (with a warning) when this process cannot run it."""
        reason = incompatibility(info, step.block_size, step.model.cpu_kernels)
        if reason is not None:
            log.warning("compiled.not_used", kind=info.kind, reason=reason)
            return None
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

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def accepts(self, batch: int, max_context: int) -> bool:
        return batch <= self.max_batch and max_context <= self.info.max_seq_len

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        kv_caches: list[torch.Tensor],
        pad_slot: int,
    ) -> torch.Tensor:
        """Pad the batch up to its bucket (padding rows write `pad_slot` and read block
        pad_slot // block_size), run, and return the real rows' logits."""
        batch, width = block_tables.shape
        self._validate(batch, width, slot_mapping, block_tables, context_lens, kv_caches, pad_slot)
        padded = self.bucket(batch)
        if padded != batch:
            extra = padded - batch
            pad_block = pad_slot // self.info.block_size
            input_ids = torch.cat([input_ids, input_ids.new_zeros(extra)])
            positions = torch.cat([positions, positions.new_zeros(extra)])
            slot_mapping = torch.cat([slot_mapping, slot_mapping.new_full((extra,), pad_slot)])
            block_tables = torch.cat([block_tables, block_tables.new_full((extra, width), pad_block)])
            context_lens = torch.cat([context_lens, context_lens.new_ones(extra)])
        self.calls += 1
        out: list[torch.Tensor] = self._loader.run(
            [input_ids, positions, slot_mapping, block_tables, context_lens, *kv_caches]
        )
        return out[0][:batch]

    def _validate(
        self,
        batch: int,
        width: int,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        kv_caches: list[torch.Tensor],
        pad_slot: int,
    ) -> None:
        """What the compiled code trusts blindly; a failure here is an engine bug, never user input."""
        num_slots = self._num_slots
        num_blocks = num_slots // self.info.block_size
        problems = []
        if not 1 <= batch <= self.max_batch or not 1 <= width <= self.max_blocks:
            problems.append(f"batch {batch} x {width} blocks is outside 1..{self.max_batch} x 1..{self.max_blocks}")
        if slot_mapping.shape != (batch,) or context_lens.shape != (batch,):
            problems.append("slot_mapping and context_lens must have one entry per sequence")
        if any(cache.shape[0] != num_slots for cache in kv_caches):
            problems.append(f"every KV cache must have {num_slots} slots")
        if not problems:
            if int(slot_mapping.min()) < 0 or int(slot_mapping.max()) >= num_slots or not 0 <= pad_slot < num_slots:
                problems.append("a slot is outside the KV cache")
            if int(block_tables.min()) < 0 or int(block_tables.max()) >= num_blocks:
                problems.append("a block id is outside the KV cache")
            if int(context_lens.min()) < 1 or int(context_lens.max()) > width * self.info.block_size:
                problems.append("a context length is outside its block table")
        if problems:
            raise InternalError("compiled decode step refused its inputs: " + "; ".join(problems))
