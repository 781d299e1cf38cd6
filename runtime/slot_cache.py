"""The ONNX target's KV cache: one slot per running sequence, in memory the OS commits as written.

onnxruntime's CPU GroupQueryAttention reads and writes a per-row cache [batch, kv_heads, max_len,
head_dim] in place (past and present bound to one buffer); it has no paged layout. Giving every
slot the whole context would reserve slots x max_len tokens up front, so the cache is one anonymous
mapping made without reserving swap (MAP_NORESERVE): the OS commits a page when a token is first
written there, and `release` hands a finished sequence's pages back (MADV_DONTNEED). What is
resident is therefore what the engine's block manager let sequences fill, which the KV budget
(`--mem`, `--kv-blocks`) bounds as on every backend.
"""

from __future__ import annotations

import mmap

import numpy as np

from llmc.artifacts.manifest import ModelSpec
from llmc.errors import OutOfResourcesError

_F32 = 4  # bytes per cached value: the graph's KV cache is float32
# Linux's MAP_NORESERVE (the same on x86-64 and aarch64); Python's mmap module names it from 3.13.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class SlotCache:
    """Per layer a key and a value array [slots, kv_heads, max_len, head_dim] float32 (views of
    one mapping, slot-major so that any run of slots is one contiguous array)."""

    def __init__(self, spec: ModelSpec, slots: int, max_len: int) -> None:
        self.slots = slots
        self.max_len = max_len
        self._slot_bytes = spec.num_kv_heads * max_len * spec.head_dim * _F32
        self._array_bytes = slots * self._slot_bytes
        size = 2 * spec.num_layers * self._array_bytes
        try:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        except OSError as exc:  # strict overcommit (vm.overcommit_memory=2) counts the whole mapping
            raise OutOfResourcesError(
                f"cannot map {size / 2**30:.1f} GiB of address space for {slots} KV slots of {max_len} tokens "
                f"({exc.strerror}); lower --max-num-seqs or --max-model-len"
            ) from exc
        flat = np.frombuffer(self._map, dtype=np.float32)
        shape = (slots, spec.num_kv_heads, max_len, spec.head_dim)
        count = self._array_bytes // _F32
        self.arrays = [flat[i * count : (i + 1) * count].reshape(shape) for i in range(2 * spec.num_layers)]

    def release(self, slot: int) -> None:
        """Give a finished sequence's pages back to the OS (they read as zeros afterwards)."""
        if self._slot_bytes % mmap.PAGESIZE:
            return  # a slot that does not start on a page boundary keeps its pages until reused
        for i in range(len(self.arrays)):
            self._map.madvise(mmap.MADV_DONTNEED, i * self._array_bytes + slot * self._slot_bytes, self._slot_bytes)
