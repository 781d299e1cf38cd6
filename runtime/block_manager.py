"""The block manager knows only block ids: which are free, and which a sequence holds."""

from __future__ import annotations

from collections import deque

from llmc.runtime.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(len(seq)) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence the blocks its whole current token list needs."""
        assert not seq.block_table
        seq.block_table = [self._free.popleft() for _ in range(self.blocks_needed(len(seq)))]

    def can_append(self, seq: Sequence) -> bool:
        """Room for the sequence's newest token: a new block is needed only when the last one is full."""
        return self.blocks_needed(len(seq)) <= len(seq.block_table) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        if self.blocks_needed(len(seq)) > len(seq.block_table):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
