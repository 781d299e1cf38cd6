"""The scheduler sees only sequences and budgets: who prefills, who decodes, who is preempted."""

from __future__ import annotations

from collections import deque

from llmc.runtime.block_manager import BlockManager
from llmc.runtime.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_batched_tokens: int) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Prefill waiting sequences when any fit, otherwise decode every running one."""
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if batch and tokens + len(seq) > self.max_batched_tokens:
                break
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            tokens += len(seq)
            batch.append(seq)
        if batch:
            self.running.extend(batch)
            return batch, True
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted for an earlier sequence in this loop
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.blocks.append_slot(seq)
                batch.append(seq)
        return batch, False

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks and requeue it first; its tokens are recomputed on re-admission."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
