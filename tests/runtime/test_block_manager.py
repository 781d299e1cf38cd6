"""Prefix-cache block digests: the whole parent chain and the cache salt decide a block's identity."""

from __future__ import annotations

from llmc.runtime.block_manager import BlockManager, block_hash
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import NO_HASH, Sequence

BLOCK = tuple(range(16))


def test_same_tokens_under_different_parents_differ() -> None:
    first = block_hash(BLOCK, NO_HASH)
    other_first = block_hash(tuple(range(1, 17)), NO_HASH)
    assert block_hash(BLOCK, first) != block_hash(BLOCK, other_first)
    assert block_hash(BLOCK, first) != first  # a block's digest is not its parent's


def test_salt_changes_the_chain_and_equal_inputs_are_stable() -> None:
    plain, salted, other = (block_hash(BLOCK, NO_HASH, s) for s in (None, "tenant-a", "tenant-b"))
    assert len({plain, salted, other}) == 3
    assert block_hash(BLOCK, NO_HASH, "") == plain  # an empty salt is no salt
    assert block_hash(BLOCK, salted) != block_hash(BLOCK, other)  # the salt carries down the chain
    assert block_hash(BLOCK, NO_HASH, "tenant-a") == salted
    assert block_hash(BLOCK, salted, "ignored below the first block") == block_hash(BLOCK, salted)
    assert len(salted) == 32  # sha256


def _admit(manager: BlockManager, tokens: list[int], salt: str | None) -> Sequence:
    seq = Sequence("r", tokens, SamplingParams(max_tokens=1, cache_salt=salt))
    manager.allocate(seq)
    seq.num_computed = len(tokens)
    manager.register_computed(seq)
    return seq


def test_blocks_are_shared_only_under_the_same_salt() -> None:
    manager = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(3, 20))  # four full blocks and one token
    manager.free(_admit(manager, prompt, "a"))
    assert _admit(manager, prompt, "b").num_cached == 0
    assert _admit(manager, prompt, None).num_cached == 0
    assert _admit(manager, prompt, "a").num_cached == 16
