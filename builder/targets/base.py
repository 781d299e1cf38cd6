"""The build's device seam: what a target (the CPU today, a GPU later) adds to an artifact.

`build()` plans the model and writes its weights the same way for every target; a target then
adds its device code beside them (a kernel library, compiled steps) and describes it in the
manifest's `targets` section (artifacts/manifest.py TargetCode). A new device is a sibling module
of `cpu.py` implementing `Target`, not a branch in build.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch

from llmc.artifacts.manifest import ModelSpec, TargetCode
from llmc.artifacts.writer import ArtifactWriter
from llmc.builder import DEFAULT_BUCKETS
from llmc.errors import BadInputError

DEFAULT_BLOCK_SIZE = 16  # the engine's default KV block size (runtime/engine.py)


class Progress(Protocol):
    """on_progress(what, done, total[, done_bytes, total_bytes]): a phase's label ("quantizing
    weights", "compiling the decode step") and how far it got, in steps and, where the steps differ
    in size (tensors), in bytes; the CLI draws it as a progress bar with a rate on a terminal."""

    def __call__(
        self, label: str, done: int, total: int, done_bytes: int | None = None, total_bytes: int | None = None, /
    ) -> None: ...


@dataclass(frozen=True)
class CompileOptions:
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    max_seq_len: int | None = None  # None: the model's context length
    block_size: int = DEFAULT_BLOCK_SIZE
    # Layers per compiled program (`--layers-per-program`); None: chosen from the model's layers
    # and size (builder/layer_programs.py).
    layers_per_program: int | None = None


def not_compilable(spec: ModelSpec) -> str | None:
    """Why this model's decode step cannot be compiled yet, or None when it can."""
    if spec.num_experts:
        return "mixture-of-experts routing groups tokens by data-dependent counts, which export cannot trace"
    if (spec.rope_scaling or {}).get("rope_type") == "longrope":
        return "longrope switches factors per sequence length"
    return None


def check_options(options: CompileOptions, spec: ModelSpec) -> tuple[list[int], int]:
    """The sorted buckets and the max sequence length, or a BadInputError saying what is wrong."""
    buckets = sorted(set(options.buckets))
    if not buckets or buckets[0] < 1:
        raise BadInputError(f"--buckets must be positive batch sizes, got {list(options.buckets)}")
    max_seq_len = options.max_seq_len or spec.max_position_embeddings
    if max_seq_len > spec.max_position_embeddings:
        raise BadInputError(
            f"--max-seq-len {max_seq_len} exceeds the model's context length {spec.max_position_embeddings}"
        )
    if max_seq_len < options.block_size:
        raise BadInputError(f"--max-seq-len must be at least the block size {options.block_size}")
    return buckets, max_seq_len


@dataclass(frozen=True)
class TargetOutput:
    """What a target added to the artifact: its manifest section, and for the build's summary why
    a requested compile did not happen and how long compiling took."""

    code: TargetCode
    compile_skipped: str | None = None
    compile_seconds: float | None = None


class Target(ABC):
    """One device's part of a build. `build()` calls, in order: `check` (before anything slow),
    `start` (once the artifact's staging folder exists, before the weights are written: work that
    needs no weights runs beside them), `finish` (after the weights: add the device code), and
    `close` at the end, or `abort` when the build fails."""

    name: str  # the manifest's target key and `llmc build --target` value
    default_dtype: str  # `--dtype auto`: the fast unquantized dtype on this device

    @abstractmethod
    def check(self, spec: ModelSpec) -> None:
        """Refuse this target's flags for this model (BadInputError) before the slow part."""

    @abstractmethod
    def start(self, writer: ArtifactWriter) -> None:
        """Begin the work that needs no weights (compiling a kernel library)."""

    @abstractmethod
    def finish(
        self,
        writer: ArtifactWriter,
        spec: ModelSpec,
        formats: dict[str, str],
        dtype: torch.dtype,
        on_progress: Progress | None,
    ) -> TargetOutput:
        """Add the device code for the weights the writer has staged; its manifest section."""

    @abstractmethod
    def close(self) -> None:
        """Release what `start` took (the build succeeded)."""

    @abstractmethod
    def abort(self) -> None:
        """Stop what `start` began without waiting (the build failed)."""
