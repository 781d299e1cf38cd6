"""What torch's device backends share: the compute dtype, the KV cache in torch tensors, a model
from model/decoder.py and runtime/runner.py's ModelRunner over it (runtime/backends/base.py is
the torch-free seam the engine sees)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import torch
from safetensors import SafetensorError

from llmc.artifacts.manifest import Manifest, ModelSpec
from llmc.artifacts.reader import Artifact
from llmc.errors import BadArtifactError, LlmcError, OutOfResourcesError
from llmc.model.decode_step import DecodeStep
from llmc.model.decoder import COMPUTE_DTYPES, CausalLM
from llmc.model.kv_layout import KVCaches, kv_bytes_per_token
from llmc.runtime.backends.base import Backend
from llmc.runtime.bucketed_step import BucketedStep
from llmc.runtime.runner import ModelRunner


class TorchBackend(Backend):
    """A device that runs llmc's torch model: it prepares the weights, allocates the KV cache and
    runs compiled steps; ModelRunner drives them."""

    def compute_dtype(self, manifest: Manifest) -> torch.dtype:
        """The dtype of activations and the KV cache: the artifact's own by default."""
        return COMPUTE_DTYPES[manifest.dtype]

    def kv_bytes_per_token(self, manifest: Manifest) -> int:
        return kv_bytes_per_token(manifest.model, self.compute_dtype(manifest))

    def make_runner(
        self, artifact: Artifact, max_model_len: int, num_blocks: int, block_size: int, compiled: bool
    ) -> ModelRunner:
        model = _built(lambda: self.load_model(artifact, max_model_len, self.compute_dtype(artifact.manifest)))
        runner = ModelRunner(model, self, num_blocks, block_size)
        if compiled:
            runner.load_compiled(artifact)
        return runner

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


# What building a model from a manifest that passed validate() may still raise where its fields
# and tensors disagree in ways the static checks do not cover (a MoE layout against the layers, a
# longrope factor list against the rotated width, a quantized layout on a float tensor).
_BUILD_ERRORS = (KeyError, ValueError, IndexError, AttributeError, TypeError, RuntimeError, SafetensorError)


def _built(load: Callable[[], CausalLM]) -> CausalLM:
    """`load()`, with a failure of the artifact's own making said as BadArtifactError rather than a
    traceback (artifacts come from strangers), and an allocation failure as OutOfResourcesError."""
    try:
        return load()
    except LlmcError:
        raise
    except MemoryError as exc:
        raise OutOfResourcesError("not enough memory to load this model; free memory or use a smaller one") from exc
    except _BUILD_ERRORS as exc:
        if isinstance(exc, RuntimeError) and "allocate" in str(exc):  # torch's allocator failing
            raise OutOfResourcesError(f"not enough memory to load this model ({exc})") from exc
        raise BadArtifactError(
            f"the model cannot be built from this artifact's description and tensors "
            f"({type(exc).__name__}: {exc}); rebuild it with this llmc (if this llmc built it, please report it)"
        ) from exc
