"""Giving back, once the model is loaded, the memory that loading left resident and serving does
not need: pages of mapped weight files read once to build a prepared copy, and heap that parsers
freed but the C allocator kept. Linux (and glibc) only; elsewhere every function does nothing.

Nothing here changes what a process reads: a dropped page of a file mapping is read again from
the file (the page cache) when touched, and the heap given back was free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from pathlib import Path

from llmc.logs import get_logger

log = get_logger("llmc.resident")

# The C library, for madvise and malloc_trim; None where none loads.
_LIBC_NAME = ctypes.util.find_library("c")
LIBC = ctypes.CDLL(_LIBC_NAME, use_errno=True) if _LIBC_NAME else None
_MAPS = Path("/proc/self/maps")
_SMAPS = Path("/proc/self/smaps")


def file_mappings(paths: set[str]) -> list[tuple[int, int]]:
    """The address ranges at which this process maps any of `paths` (from /proc/self/maps)."""
    ranges = []
    try:
        lines = _MAPS.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in paths:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def drop_range(start: int, end: int) -> None:
    """MADV_DONTNEED on the whole pages inside [start, end). The caller vouches that the range is
    a file mapping nobody wrote to: on anonymous memory, or on a written page of a private
    mapping, this would zero or undo data."""
    if LIBC is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def drop_clean_file_pages(path: str) -> int:
    """Drop from the resident set every mapping of `path` (a library's own mappings included)
    that holds no written page; return the bytes that were resident in them.

    For a library that maps a weight file and keeps its own prepared copy of most of it
    (onnxruntime prepacks MatMulNBits weights), the pages it read stay resident while the file is
    mapped: RSS would hold those weights twice. A page written through a private mapping becomes
    the process's own (smaps counts it as `Anonymous`), and dropping it would undo the write: a
    mapping with any such page is left whole. The others' pages are the file's (the page cache's,
    dirty or not) and are read back from it when touched."""
    try:
        text = _SMAPS.read_text()
    except OSError:
        return 0
    dropped = 0
    current: dict[str, int] | None = None
    candidates: list[dict[str, int]] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            current = None
            if len(fields) == 6 and fields[5] == path:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = {"start": start, "end": end}
                candidates.append(current)
        elif current is not None and fields[0] in ("Rss:", "Anonymous:"):
            current[fields[0]] = int(fields[1]) * 1024
    for mapping in candidates:
        if mapping.get("Anonymous:", 1):
            continue  # written through (or unknown): keep
        drop_range(mapping["start"], mapping["end"])
        dropped += mapping.get("Rss:", 0)
    return dropped


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not from a fresh mmap per allocation: glibc's
# largest allowed threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB). A prefill's
# activations (tokens x intermediate size x 4 bytes) are MBs; mapped afresh each step, every page
# of them faults in zeroed again.
HEAP_BLOCK_MAX = 32 << 20
# Free memory at the heap's top kept rather than given back after each free: above any step's
# working set at the sizes llmc serves on a CPU, so the next step reuses it. `trim_heap` (called
# when the engine goes idle) still returns it all.
HEAP_KEEP_FREE = 1 << 30


def keep_freed_heap() -> bool:
    """Keep memory freed between steps for the next step instead of unmapping it and faulting it
    in again. glibc's default moves its mmap threshold with the sizes it sees and trims the heap
    at 2x that threshold, so a prefill's MB-sized activations kept coming back as fresh pages:
    6,500 to 49,000 page faults per 500-token prefill of SmolLM2, 5-25 % of its time on AVX2
    (docs/BENCHMARKS.md). False where the C library has no mallopt (not glibc)."""
    mallopt = getattr(LIBC, "mallopt", None) if LIBC is not None else None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP_FREE))


def trim_heap() -> bool:
    """Return the C heap's free memory to the system (glibc's malloc_trim). Parsing a tokenizer's
    JSON or an ONNX graph frees tens of MB that glibc otherwise keeps resident. False where the C
    library has no malloc_trim (not glibc)."""
    trim = getattr(LIBC, "malloc_trim", None) if LIBC is not None else None
    if trim is None:
        return False
    trim(0)
    return True
