"""One step's inputs, built on the host from the scheduled sequences: the flattened tokens, their
positions and cache slots, and the attention metadata (one SeqSlice per sequence; the decode
form's tensors derive from it). Device-neutral: the runner moves what it runs to the device."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmc.kernels.paged_attention import PagedAttention, SeqSlice, block_tables_tensor
from llmc.model.attention import StepContext
from llmc.runtime.sequence import Sequence


def _int64(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


@dataclass
class InputBatch:
    block_size: int
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    slices: list[SeqSlice] = field(default_factory=list)
    done: list[Sequence] = field(default_factory=list)  # sequences fully computed after this step
    rows: list[int] = field(default_factory=list)  # their last token's row
    prompt_rows: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> rows predicting prompt tokens
    long_rope: list[bool] | None = None  # per row: longrope's long factors apply (Phi-3 only)

    @classmethod
    def build(cls, batch: list[tuple[Sequence, int]], block_size: int, long_rope_after: int | None) -> InputBatch:
        """The inputs that compute `n` more tokens of each (seq, n); advances each seq.num_computed."""
        out = cls(block_size, long_rope=[] if long_rope_after is not None else None)
        bs = block_size
        for seq, count in batch:
            start = seq.num_computed
            end = start + count
            tokens = seq.token_ids
            out.slices.append(
                SeqSlice(
                    query_start=len(out.input_ids),
                    query_len=count,
                    context_len=end,
                    block_table=torch.tensor(seq.block_table, dtype=torch.int64),
                )
            )
            out.input_ids.extend(tokens[start:end])
            out.positions.extend(range(start, end))
            out.slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
            if out.long_rope is not None and long_rope_after is not None:
                # longrope picks its factors by the sequence's whole length (HF: the longest
                # position in the forward pass), so every chunk of a long prompt agrees.
                out.long_rope.extend([len(tokens) > long_rope_after] * count)
            # Rows predicting prompt tokens whose logprobs are not recorded yet: a preempted
            # sequence recomputes its prompt from 0, and its recorded ones stand (rows for them
            # again ran the record past the prompt's end: an IndexError, a 500).
            needed = max(start, len(seq.prompt_logprobs) - 1)
            stop = min(end, len(seq.prompt_ids) - 1)
            if seq.params.prompt_logprobs is not None and needed < stop:
                first = len(out.input_ids) - count + needed - start
                out.prompt_rows[seq.seq_id] = list(range(first, first + stop - needed))
            seq.num_computed = end
            if end == len(tokens):
                out.done.append(seq)
                out.rows.append(len(out.input_ids) - 1)
        return out

    @property
    def num_seqs(self) -> int:
        return len(self.slices)

    @property
    def max_context(self) -> int:
        return max(s.context_len for s in self.slices)

    def is_plain_decode(self) -> bool:
        """One new token per sequence and nothing else asked of the step: what a compiled decode
        step computes."""
        return not self.prompt_rows and self.long_rope is None and all(s.query_len == 1 for s in self.slices)

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decode form's tensors: input_ids, positions, slot_mapping, block_tables, context_lens."""
        return (
            _int64(self.input_ids),
            _int64(self.positions),
            _int64(self.slots),
            block_tables_tensor(self.slices, self.block_size),
            _int64([s.context_len for s in self.slices]),
        )

    def step_context(self, attention: PagedAttention) -> StepContext:
        """The eager form, for any mix of prefill chunks and decodes."""
        return StepContext(
            slot_mapping=_int64(self.slots),
            block_size=self.block_size,
            seqs=self.slices,
            rope_long=torch.tensor(self.long_rope) if self.long_rope is not None else None,
            attention=attention,
        )
