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
        # After run(): seq_id -> logits at the prompt positions of sequences that asked for prompt logprobs.
        self.prompt_logits: dict[int, torch.Tensor] = {}
        spec = model.spec
        dtype = model.dtype
        # Flat [slots, kv_heads, head_dim] per layer (kernels/paged_attention.py says why).
        k_shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        v_shape = (num_blocks * block_size, spec.num_kv_heads, spec.v_head_dim or spec.head_dim)
        self.kv_caches = [
            (torch.zeros(k_shape, dtype=dtype), torch.zeros(v_shape, dtype=dtype)) for _ in range(spec.num_layers)
        ]

    @staticmethod
    def kv_bytes_per_token(model: CausalLM) -> int:
        spec = model.spec
        element = model.dtype.itemsize
        return spec.num_layers * spec.num_kv_heads * (spec.head_dim + (spec.v_head_dim or spec.head_dim)) * element

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], all_logits: bool = False) -> tuple[list[Sequence], torch.Tensor]:
        """Compute `n` more tokens of each (seq, n); return the sequences now fully computed, with
        the logits of their last token (every position's logits instead with `all_logits`)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        slices: list[SeqSlice] = []
        done: list[Sequence] = []
        rows: list[int] = []
        prompt_rows: dict[int, list[int]] = {}  # seq_id -> rows whose next token is a prompt token
        long_rope: list[bool] = []
        long_after = self.model.long_rope_after
        bs = self.block_size
        for seq, count in batch:
            start = seq.num_computed
            end = start + count
            tokens = seq.token_ids
            slices.append(
                SeqSlice(
                    query_start=len(input_ids),
                    query_len=count,
                    context_len=end,
                    block_table=torch.tensor(seq.block_table, dtype=torch.int64),
                )
            )
            input_ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
            if long_after is not None:
                # longrope picks its factors by the sequence's whole length (HF: the longest
                # position in the forward pass), so every chunk of a long prompt agrees.
                long_rope.extend([len(tokens) > long_after] * count)
            if seq.params.prompt_logprobs is not None and start < len(seq.prompt_ids) - 1:
                first = len(input_ids) - count
                prompt_rows[seq.seq_id] = list(range(first, first + min(end, len(seq.prompt_ids) - 1) - start))
            seq.num_computed = end
            if end == len(tokens):
                done.append(seq)
                rows.append(len(input_ids) - 1)
        ctx = StepContext(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_size=bs,
            seqs=slices,
            rope_long=torch.tensor(long_rope) if long_after is not None else None,
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64),
            torch.tensor(positions, dtype=torch.int64),
            self.kv_caches,
            ctx,
        )
        self.prompt_logits = {
            seq_id: self.model.compute_logits(hidden[torch.tensor(r, dtype=torch.int64)])
            for seq_id, r in prompt_rows.items()
        }
        if not all_logits:
            hidden = hidden[torch.tensor(rows, dtype=torch.int64)]
        return done, self.model.compute_logits(hidden)
