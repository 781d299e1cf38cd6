"""The device seam: what the runtime asks of a device, and nothing else knows about one.

A backend owns the device and dtype policy, the memory budget's share for the KV cache and the
cache's allocation, weight preparation (kernel layouts, fused projections, dense copies) and the
attention implementation (together: model/decoder.py's DeviceKernels), the device's kernel
libraries, and its executors of compiled steps (runtime/bucketed_step.py). The engine, scheduler,
block manager, sequences and runner are device-neutral and reach the device only through here;
a new device is a sibling of cpu.py registered in runtime/backends/__init__.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from llmc.artifacts.manifest import Manifest, ModelSpec
from llmc.artifacts.reader import Artifact
from llmc.model.decode_step import DecodeStep
from llmc.model.decoder import COMPUTE_DTYPES, CausalLM
from llmc.model.kv_layout import KVCaches
from llmc.runtime.bucketed_step import BucketedStep


@dataclass(frozen=True)
class BackendOptions:
    """The engine's settings a backend may use (EngineConfig's device-facing part)."""

    threads: int | None = None  # the host's compute threads; None: torch's default
    # Keep dense copies of quantized weights for prefill and big batches; None: when memory allows.
    dense_weights: bool | None = None
    # Measure which weight form serves which batch size on this host (kernels/cpu/autotune.py,
    # cached); False: the built-in defaults (`--no-autotune`).
    autotune: bool = True
    # The most activation rows one step multiplies (prefill chunks or decode batches): a dense copy
    # that only wins above it is never kept. None: no bound.
    max_rows: int | None = None


class Backend(ABC):
    """One device's policies; made once per engine, before the model."""

    name: str  # the device, as `EngineConfig.device` names it

    def __init__(self, options: BackendOptions) -> None:
        self.options = options

    def compute_dtype(self, manifest: Manifest) -> torch.dtype:
        """The dtype of activations and the KV cache: the artifact's own by default."""
        return COMPUTE_DTYPES[manifest.dtype]

    def kv_blocks(self, budget_bytes: int, bytes_per_block: int) -> int:
        """How many KV blocks a memory budget holds (a device may keep some of it back)."""
        return budget_bytes // bytes_per_block

    @abstractmethod
    def allocate_kv(self, spec: ModelSpec, dtype: torch.dtype, num_slots: int) -> KVCaches:
        """Zeroed (keys, values) per layer in this device's memory (model/kv_layout.py's layout)."""

    @abstractmethod
    def load_model(self, artifact: Artifact, max_positions: int, dtype: torch.dtype) -> CausalLM:
        """The artifact's model with its weights prepared for this device."""

    @abstractmethod
    def load_steps(self, artifact: Artifact, step: DecodeStep, num_slots: int) -> list[BucketedStep]:
        """The artifact's compiled decode steps this process can run on this device (a warning
        says why for each it cannot); `num_slots`: the KV cache's, pad slot included."""

    @abstractmethod
    def choose_step(self, steps: list[BucketedStep], batch: int, max_context: int) -> BucketedStep | None:
        """The compiled step for a decode batch, or None to run it eagerly."""

    def describe(self) -> dict[str, Any]:
        """What the engine's ready log reports of the device's choices."""
        return {"device": self.name}
