"""The model runner owns the tensors: the model and the KV cache. Each step it builds the batch's
inputs on the host (runtime/input_batch.py) and runs them through a compiled bucketed step where
the device backend has one for the batch (runtime/bucketed_step.py), else eagerly."""

from __future__ import annotations

import torch

from llmc.artifacts.reader import Artifact
from llmc.model.decode_step import DecodeStep
from llmc.model.decoder import CausalLM
from llmc.runtime.backends.base import Backend
from llmc.runtime.bucketed_step import BucketedStep
from llmc.runtime.input_batch import InputBatch
from llmc.runtime.sequence import Sequence


def _int64(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


class ModelRunner:
    def __init__(self, model: CausalLM, backend: Backend, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        # After run(): seq_id -> logits at the prompt positions of sequences that asked for prompt logprobs.
        self.prompt_logits: dict[int, torch.Tensor] = {}
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

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], all_logits: bool = False) -> tuple[list[Sequence], torch.Tensor]:
        """Compute `n` more tokens of each (seq, n); return the sequences now fully computed, with
        the logits of their last token (every position's logits instead with `all_logits`)."""
        inputs = InputBatch.build(batch, self.block_size, self.model.long_rope_after)
        decoding = not all_logits and inputs.is_plain_decode()
        compiled = self._compiled_for(inputs.num_seqs, inputs.max_context) if decoding else None
        if compiled is not None:
            self.prompt_logits = {}
            logits = compiled(*inputs.decode_inputs(), self._kv_flat, self._pad_slot)
            return inputs.done, logits[_int64(inputs.rows)] if len(inputs.rows) != inputs.num_seqs else logits
        hidden = self.model(
            _int64(inputs.input_ids),
            _int64(inputs.positions),
            self.kv_caches,
            inputs.step_context(self.model.attention),
        )
        self.prompt_logits = {
            seq_id: self.model.compute_logits(hidden[_int64(r)]) for seq_id, r in inputs.prompt_rows.items()
        }
        if not all_logits:
            hidden = hidden[_int64(inputs.rows)]
        return inputs.done, self.model.compute_logits(hidden)
