"""File helpers shared by the writer and the reader."""

from __future__ import annotations

import hashlib
from pathlib import Path

# Read size for hashing: large enough to amortise syscalls, small enough to stay in cache.
_HASH_CHUNK_BYTES = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
