"""A decode step compiled for a few batch sizes (buckets): each call pads its batch up to the
smallest bucket that holds it, runs, and keeps the real rows. The padding and the checks of what
compiled code trusts blindly are written once, here; a device's executor (runtime/backends/:
the CPU's AOTInductor package, later a CUDA graph per bucket) only runs a padded batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from llmc.artifacts.manifest import CompiledStep
from llmc.errors import InternalError


class BucketedStep(ABC):
    """Call with the decode step's inputs (model/decode_step.py's DecodeStep.forward) and the pad
    slot for [B, vocab] float32 logits."""

    def __init__(self, info: CompiledStep, num_slots: int, max_positions: int | None = None) -> None:
        """`max_positions`: the rows of the position tables the step reads (the runtime model's
        rope tables, handed to it at load); None: the compiled maximum sequence length."""
        self.info = info
        self.buckets = info.buckets
        self.max_batch = info.buckets[-1]
        self.max_blocks = info.max_seq_len // info.block_size
        self._num_slots = num_slots
        self._max_positions = info.max_seq_len if max_positions is None else max_positions
        self.calls = 0  # steps this executor ran

    @abstractmethod
    def _run(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Run one padded batch: [input_ids, positions, slot_mapping, block_tables, context_lens,
        *kv_caches], each batch dimension a bucket; the logits of every row."""

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
        self._validate(batch, width, positions, slot_mapping, block_tables, context_lens, kv_caches, pad_slot)
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
        out = self._run([input_ids, positions, slot_mapping, block_tables, context_lens, *kv_caches])
        return out[:batch]

    def _validate(
        self,
        batch: int,
        width: int,
        positions: torch.Tensor,
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
        if positions.shape != (batch,) or slot_mapping.shape != (batch,) or context_lens.shape != (batch,):
            problems.append("positions, slot_mapping and context_lens must have one entry per sequence")
        if any(cache.shape[0] != num_slots for cache in kv_caches):
            problems.append(f"every KV cache must have {num_slots} slots")
        if not problems:
            if int(slot_mapping.min()) < 0 or int(slot_mapping.max()) >= num_slots or not 0 <= pad_slot < num_slots:
                problems.append("a slot is outside the KV cache")
            if int(block_tables.min()) < 0 or int(block_tables.max()) >= num_blocks:
                problems.append("a block id is outside the KV cache")
            if int(context_lens.min()) < 1 or int(context_lens.max()) > width * self.info.block_size:
                problems.append("a context length is outside its block table")
            if int(positions.min()) < 0 or int(positions.max()) >= self._max_positions:
                problems.append(f"a position is outside the rope tables' {self._max_positions} rows")
        if problems:
            raise InternalError("compiled decode step refused its inputs: " + "; ".join(problems))
