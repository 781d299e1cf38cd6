"""The model runner of torch's backends owns the tensors: the model and the KV cache. Each step it
builds the batch's inputs on the host (runtime/input_batch.py) and runs them through a compiled
bucketed step where the device backend has one for the batch (runtime/bucketed_step.py), else
eagerly. It hands the engine float32 numpy logits (runtime/backends/base.py's Runner)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmc.artifacts.reader import Artifact
from llmc.model.decode_step import DecodeStep
from llmc.model.decoder import CausalLM
from llmc.runtime.backends.base import Runner
from llmc.runtime.bucketed_step import BucketedStep
from llmc.runtime.input_batch import InputBatch
from llmc.runtime.sequence import Sequence

if TYPE_CHECKING:
    from llmc.runtime.backends.torch_base import TorchBackend


def _int64(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _numpy(logits: torch.Tensor) -> np.ndarray:
    """float32 numpy logits; on the CPU a float32 tensor's memory is shared, not copied."""
    return logits.float().cpu().numpy()


class ModelRunner(Runner):
    def __init__(self, model: CausalLM, backend: TorchBackend, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.vocab_size = model.spec.vocab_size
        self.long_rope_after = model.long_rope_after
        self.prompt_logits: dict[int, np.ndarray] = {}
        # One block more than the block manager hands out: the rows that pad a compiled step's
        # batch up to its bucket write their keys there, where no sequence reads.
        self._pad_slot = num_blocks * block_size
        self.kv_caches = backend.allocate_kv(model.spec, model.dtype, (num_blocks + 1) * block_size)
        self._kv_flat = [cache for pair in self.kv_caches for cache in pair]
        self.compiled: list[BucketedStep] = []

    def load_compiled(self, artifact: Artifact) -> None:
        """Use the artifact's compiled decode steps that the backend can run, for the steps they cover."""
        step = DecodeStep(self.model, self.block_size)
        self.compiled = self.backend.load_steps(artifact, step, self._kv_flat[0].shape[0])

    def _compiled_for(self, batch: int, max_context: int) -> BucketedStep | None:
        return self.backend.choose_step(self.compiled, batch, max_context)

    @property
    def compiled_steps(self) -> int:
        """Steps the compiled code ran (the rest ran eagerly)."""
        return sum(c.calls for c in self.compiled)

    def describe(self) -> dict[str, Any]:
        return {"compiled": [c.info.weights for c in self.compiled]}

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], all_logits: bool = False) -> tuple[list[Sequence], np.ndarray]:
        inputs = InputBatch.build(batch, self.block_size, self.model.long_rope_after)
        decoding = not all_logits and inputs.is_plain_decode()
        compiled = self._compiled_for(inputs.num_seqs, inputs.max_context) if decoding else None
        if compiled is not None:
            self.prompt_logits = {}
            logits = compiled(*inputs.decode_inputs(), self._kv_flat, self._pad_slot)
            if len(inputs.rows) != inputs.num_seqs:
                logits = logits[_int64(inputs.rows)]
            return inputs.done, _numpy(logits)
        hidden = self.model(
            _int64(inputs.input_ids),
            _int64(inputs.positions),
            self.kv_caches,
            inputs.step_context(self.model.attention),
        )
        self.prompt_logits = {
            seq_id: _numpy(self.model.compute_logits(hidden[_int64(r)])) for seq_id, r in inputs.prompt_rows.items()
        }
        if not all_logits:
            hidden = hidden[_int64(inputs.rows)]
        return inputs.done, _numpy(self.model.compute_logits(hidden))
