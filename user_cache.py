"""The user's cache of what llmc compiles or measures on this machine (CPU kernel libraries, the
native quantizer, compiled decode packages, weight-form timings): $LLMC_CACHE_DIR, else
$XDG_CACHE_HOME/llmc or ~/.cache/llmc.

What is found there is loaded into processes or copied into artifacts, so every folder must be
this user's alone (0700, checked), files appear whole or not at all (written beside, then
renamed), and a file is reused only when it matches the sha256 recorded beside it after it was
written.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from llmc.errors import InternalError
from llmc.logs import get_logger

log = get_logger("llmc.cache")

CACHE_ENV = "LLMC_CACHE_DIR"
# Beside each verified file: its sha256, written after it, checked before the file is reused.
DIGEST_SUFFIX = ".sha256"


def cache_root() -> Path:
    """The folder every llmc cache lives under."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "llmc")
    return Path(root).expanduser()


def is_private(path: Path) -> bool:
    """Whether the existing folder `path` is this user's and nobody else can write it."""
    status = path.stat()
    return status.st_uid == os.getuid() and not status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def private_dir(path: Path, what: str) -> None:
    """Make `path` (and its parents) a folder only this user can write; InternalError naming
    `what` ("the compile cache") where it exists and is someone else's or writable by others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not is_private(path):
        raise InternalError(f"{what} {path} is writable by others or not yours; remove it or set ${CACHE_ENV}")


def write_atomically(path: Path, data: bytes) -> None:
    """Write a new file beside `path`, then rename it over `path`: readers see all of it or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_verified(path: Path, data: bytes) -> None:
    """`data` into `path`, then its sha256 beside it (read_verified's check)."""
    write_atomically(path, data)
    write_atomically(path.with_name(path.name + DIGEST_SUFFIX), hashlib.sha256(data).hexdigest().encode())


def read_verified(path: Path, event: str) -> bytes | None:
    """The bytes of `path` if they match the sha256 recorded beside them; None (with the warning
    `event` on a mismatch) when either file is missing or they differ."""
    try:
        data = path.read_bytes()
        recorded = path.with_name(path.name + DIGEST_SUFFIX).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if hashlib.sha256(data).hexdigest() != recorded:
        log.warning(event, path=str(path))
        return None
    return data
