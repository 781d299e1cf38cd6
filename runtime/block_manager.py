"""The block manager knows only block ids, reference counts and content hashes.

Prefix caching: a full block is identified by a sha256 digest of its tokens chained with the
digest of the blocks before it (and, for the first block, the request's cache salt), so equal
prefixes map to equal block chains, and a block is shared only by requests whose whole prefix and
salt are equal. The digest is cryptographic because clients choose the tokens: with an unkeyed
hash they could craft a collision and be served another client's cached blocks (vLLM's
GHSA-rm76-4mrf-v9r8). A sequence whose prompt starts with cached blocks takes them (reference
count + 1) and skips computing them. Freed blocks keep their content and hash until they are
reused for something else, oldest-freed first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from llmc.runtime.sequence import NO_HASH, Sequence

_NO_HASH = NO_HASH


def block_hash(tokens: tuple[int, ...], parent: bytes, salt: str | None = None) -> bytes:
    """sha256 of (parent digest, salt for the first block, token ids).

    The parent is empty or a 32-byte digest, the salt is length-prefixed and the tokens come last,
    so two different inputs never encode to the same bytes.
    """
    digest = hashlib.sha256(len(parent).to_bytes(1, "little") + parent)
    if not parent:
        salt_bytes = salt.encode("utf-8") if salt is not None else b""
        digest.update(len(salt_bytes).to_bytes(8, "little") + salt_bytes)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self._refs = [0] * num_blocks
        self._hash: list[bytes] = [_NO_HASH] * num_blocks
        self._tokens: list[tuple[int, ...]] = [()] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        # Free blocks in the order they were freed: the oldest cached content is evicted first.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------------
    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix; the last token is always left to compute."""
        if not self.enable_prefix_cache or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        hits: list[int] = []
        tokens = seq.token_ids
        parent = _NO_HASH
        for start in range(0, (len(tokens) - 1) // self.block_size * self.block_size, self.block_size):
            chunk = tuple(tokens[start : start + self.block_size])
            parent = block_hash(chunk, parent, seq.params.cache_salt)
            block = self._by_hash.get(parent)
            if block is None or self._tokens[block] != chunk:
                break
            hits.append(block)
        return hits

    # ---- allocation -------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        reusable_free = sum(1 for b in hits if self._refs[b] == 0)
        return self.blocks_needed(len(seq)) - len(hits) + reusable_free <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached ones for its prefix."""
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        for block in hits:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        seq.block_table = list(hits)
        seq.num_computed = len(hits) * self.block_size
        if not seq.output_ids:  # first admission, not a re-admission after preemption
            seq.num_cached = seq.num_computed
        seq.num_hashed = len(hits)
        seq.last_hash = self._hash[hits[-1]] if hits else _NO_HASH
        while len(seq.block_table) < self.blocks_needed(len(seq)):
            seq.block_table.append(self._take())

    def _take(self) -> int:
        block, _ = self._free.popitem(last=False)
        if self._hash[block] != _NO_HASH:
            if self._by_hash.get(self._hash[block]) == block:
                del self._by_hash[self._hash[block]]
            self._hash[block] = _NO_HASH
            self._tokens[block] = ()
        self._refs[block] = 1
        return block

    def can_append(self, seq: Sequence) -> bool:
        """Room for the sequence's newest token: a new block is needed only when the last one is full."""
        return self.blocks_needed(len(seq)) <= len(seq.block_table) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        if self.blocks_needed(len(seq)) > len(seq.block_table):
            seq.block_table.append(self._take())

    def register_computed(self, seq: Sequence) -> None:
        """Publish the sequence's newly computed full blocks so later requests can share them."""
        if not self.enable_prefix_cache:
            return
        bs = self.block_size
        tokens = seq.token_ids
        while seq.num_hashed < seq.num_computed // bs:
            index = seq.num_hashed
            chunk = tuple(tokens[index * bs : (index + 1) * bs])
            digest = block_hash(chunk, seq.last_hash, seq.params.cache_salt)
            block = seq.block_table[index]
            if digest not in self._by_hash:
                self._hash[block] = digest
                self._tokens[block] = chunk
                self._by_hash[digest] = block
            seq.last_hash = digest
            seq.num_hashed += 1

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            assert self._refs[block] >= 0
            if self._refs[block] == 0:
                self._free[block] = None
        seq.block_table = []
        seq.num_hashed = 0
        seq.last_hash = _NO_HASH
