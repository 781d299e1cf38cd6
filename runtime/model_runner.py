"""The model runner owns the tensors: the model, the KV cache, and each step's input tensors."""

from __future__ import annotations

import torch

from llmc.kernels.paged_attention import SeqSlice
from llmc.runtime.model import CausalLM, StepContext
from llmc.runtime.sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        spec = model.spec
        dtype = model.model.embed_tokens.weight.dtype
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(spec.num_layers)
        ]

    @staticmethod
    def kv_bytes_per_token(model: CausalLM) -> int:
        spec = model.spec
        element = model.model.embed_tokens.weight.element_size()
        return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * element

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], all_logits: bool = False) -> torch.Tensor:
        """One step: each sequence's not-yet-computed tokens go in; logits for its last one come out.

        With `all_logits`, logits for every input position (for tests and prompt scoring).
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        slices: list[SeqSlice] = []
        last_rows: list[int] = []
        for seq in seqs:
            tokens = seq.token_ids
            start = seq.num_computed
            new = tokens[start:]
            slices.append(
                SeqSlice(
                    query_start=len(input_ids),
                    query_len=len(new),
                    context_len=len(tokens),
                    block_table=torch.tensor(seq.block_table, dtype=torch.int64),
                )
            )
            input_ids.extend(new)
            positions.extend(range(start, len(tokens)))
            slots.extend(self._slot(seq, p) for p in range(start, len(tokens)))
            last_rows.append(len(input_ids) - 1)
        ctx = StepContext(slot_mapping=torch.tensor(slots, dtype=torch.int64), seqs=slices)
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64),
            torch.tensor(positions, dtype=torch.int64),
            self.kv_caches,
            ctx,
        )
        for seq in seqs:
            seq.num_computed = len(seq)
        if not all_logits:
            hidden = hidden[torch.tensor(last_rows)]
        return self.model.compute_logits(hidden)
