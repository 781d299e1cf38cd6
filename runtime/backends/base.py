"""The device seam: what the engine asks of a device, and nothing else knows about one.

A backend owns the device and its policies: the KV cache's size per token and its share of the
memory budget, and the runner that holds the model and its KV cache and turns a batch into logits
(`Runner`). The engine, scheduler, block manager, sequences and sampler are device-neutral, work on
numpy logits, and reach the device only through here, so this module imports no torch: a backend
on onnxruntime serves without it (`pip install llmc[lean]`). torch's backends share
runtime/backends/torch_base.py. A new device is a sibling of cpu.py registered in
runtime/backends/__init__.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from llmc.artifacts.manifest import Manifest

if TYPE_CHECKING:
    from llmc.artifacts.reader import Artifact
    from llmc.runtime.sequence import Sequence


@dataclass(frozen=True)
class BackendOptions:
    """The engine's settings a backend may use (EngineConfig's device-facing part)."""

    threads: int | None = None  # the host's compute threads; None: the runtime library's default
    # Keep dense copies of quantized weights for prefill and big batches; None: when memory allows.
    dense_weights: bool | None = None
    # Measure which weight form serves which batch size on this host (kernels/cpu/autotune.py,
    # cached); False: the built-in defaults (`--no-autotune`).
    autotune: bool = True
    # The most activation rows one step multiplies (prefill chunks or decode batches): a dense copy
    # that only wins above it is never kept. None: no bound.
    max_rows: int | None = None
    # The most sequences that run at once (`--max-num-seqs`): a backend with a KV slot per
    # sequence (onnx) makes this many. None: no bound given.
    max_seqs: int | None = None
    # Ask for 2 MiB pages for the KV cache (`--kv-huge-pages`). Off by default: on hosts whose THP
    # defrag setting compacts memory for such regions (`madvise`, the common default) each first
    # touch of the cache stalls, measured ~4x the cost of small pages; on a warm cache they make
    # batched decode of long, scattered contexts a few per cent faster (docs/BENCHMARKS.md).
    kv_huge_pages: bool = False
    # Fault the KV cache's pages in at start, on a thread of its own (`--no-kv-prefault`: as they
    # are first used, which costs steps that meet fresh blocks; runtime/backends/cpu.py prefault_kv).
    kv_prefault: bool = True


class Runner(ABC):
    """Owns the model and its KV cache on one device; runs the scheduler's batches.

    `run` returns float32 numpy logits, whatever the device computes in: the sampler and the
    engine are shared by every backend."""

    vocab_size: int  # the width of the logits (and of a grammar's token mask)
    # Phi-3's longrope: the position from which a sequence's cache is recomputed with the long
    # factors (the engine then turns the prefix cache off); None for every other model.
    long_rope_after: int | None = None
    # After run(): seq_id -> float32 [n, vocab] logits at the prompt positions this step computed,
    # for the sequences that asked for prompt logprobs.
    prompt_logits: dict[int, np.ndarray]

    @abstractmethod
    def run(self, batch: list[tuple[Sequence, int]], all_logits: bool = False) -> tuple[list[Sequence], np.ndarray]:
        """Compute `n` more tokens of each (seq, n); return the sequences now fully computed, with
        the float32 logits of their last token ([len(done), vocab]; every position's logits
        instead with `all_logits`)."""

    @property
    def compiled_steps(self) -> int:
        """Steps that ran ahead-of-time compiled code (for tests and benchmarks); 0 where none does."""
        return 0

    def describe(self) -> dict[str, Any]:
        """What the engine's ready log reports of the runner (its compiled steps, for one)."""
        return {}


class Backend(ABC):
    """One device's policies; made once per engine, before the model."""

    name: str  # the device, as `EngineConfig.device` names it
    # Whether a sequence may reuse another's KV blocks (the prefix cache): the runner must read a
    # cache written by earlier steps through block tables, which every backend so far does.
    supports_prefix_cache: bool = True

    def __init__(self, options: BackendOptions) -> None:
        self.options = options

    @abstractmethod
    def kv_bytes_per_token(self, manifest: Manifest) -> int:
        """KV cache bytes one token of this artifact's model takes on this device (all layers):
        known before the model is loaded, so the engine can size the context first."""

    def kv_blocks(self, budget_bytes: int, bytes_per_block: int) -> int:
        """How many KV blocks a memory budget holds (a device may keep some of it back)."""
        return budget_bytes // bytes_per_block

    @abstractmethod
    def make_runner(
        self, artifact: Artifact, max_model_len: int, num_blocks: int, block_size: int, compiled: bool
    ) -> Runner:
        """Load the artifact's model for this device with a KV cache of `num_blocks` blocks of
        `block_size` tokens; `compiled`: use the artifact's compiled steps where they run here."""

    def describe(self) -> dict[str, Any]:
        """What the engine's ready log reports of the device's choices."""
        return {"device": self.name}

    def ready(self) -> None:  # noqa: B027 - a hook that most devices leave empty
        """The engine is loaded and about to serve: background work that would slow the loading
        starts here (the CPU backend faults its KV cache in)."""
