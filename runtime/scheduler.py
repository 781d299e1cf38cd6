"""The scheduler sees only sequences and budgets: who runs this step, with how many tokens.

Each step has a token budget. Decoding sequences (one token each) go first, so streams stay
smooth; prompts are prefilled in chunks with what is left (chunked prefill), so a long prompt
never stalls the others. When the KV cache runs out, the newest sequences are preempted: their
blocks are freed and they are recomputed later (their tokens are kept).
"""

from __future__ import annotations

from collections import deque

from llmc.runtime.block_manager import BlockManager
from llmc.runtime.sequence import Sequence, SequenceStatus

ScheduledBatch = list[tuple[Sequence, int]]  # each sequence with the number of tokens it computes


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_batched_tokens: int, prefill_chunk: int
    ) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_batched_tokens
        batch: ScheduledBatch = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue  # preempted earlier in this loop, or the step is full
            remaining = len(seq) - seq.num_computed
            if not self._reserve_slot(seq):
                continue  # seq itself was preempted
            take = min(remaining, budget, self.prefill_chunk) if remaining > 1 else 1
            batch.append((seq, take))
            budget -= take
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            take = min(len(seq) - seq.num_computed, budget, self.prefill_chunk)
            batch.append((seq, take))
            budget -= take
        return batch

    def _reserve_slot(self, seq: Sequence) -> bool:
        """Make room for seq's next token, preempting the newest sequences if blocks run out."""
        while not self.blocks.can_append(seq):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.append_slot(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
