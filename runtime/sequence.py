"""A Sequence knows its tokens, its settings and where it is in its life; nothing about tensors."""

from __future__ import annotations

import enum
import itertools

import numpy as np

from llmc.runtime.sampling_params import SamplingParams, TokenLogprob
from llmc.runtime.structured_output import Constraint

_ids = itertools.count()
NO_HASH = b""  # the "digest" before a sequence's first block (runtime/block_manager.py)
# numpy's generators take seeds in 0..2**64-1; requests' seeds range over -(2**63)..2**64-1
# (runtime/api/requests.py), so they are taken modulo this: distinct seeds in one 2**64 window stay
# distinct, and the same seed always gives the same stream.
SEED_MODULUS = 2**64


def make_generator(seed: int) -> np.random.Generator:
    """A generator whose draws depend only on `seed` (any int; see SEED_MODULUS)."""
    return np.random.default_rng(seed % SEED_MODULUS)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.block_table: list[int] = []
        # Tokens whose K/V are in the cache; after a preemption this drops to 0 and all are recomputed.
        self.num_computed = 0
        self.num_cached = 0  # prompt tokens found in the prefix cache when admitted (for usage)
        # Prefix-cache bookkeeping, owned by the block manager: full blocks hashed so far and the
        # hash of the last one, so each block is hashed once.
        self.num_hashed = 0
        self.last_hash = NO_HASH
        # Logprob of each prompt token given the ones before it (the first has none), when asked for.
        self.prompt_logprobs: list[TokenLogprob | None] = [None]
        self.constraint: Constraint | None = None  # set by the engine when params.grammar is given
        # A seeded request draws from its own generator: its text does not depend on its batch mates.
        self.generator: np.random.Generator | None = None
        if params.seed is not None:
            self.generator = make_generator(params.seed)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]
