"""Where `llmc build` may write, and how it swaps a new artifact in without losing anything.

A build stages its files in `.NAME.llmc-staging-*` beside the output `NAME` (one filesystem, so
renames are atomic). Replacing an existing artifact moves it aside to `.NAME.llmc-old-*` first,
then renames the stage in, then deletes the old one; a process killed at any instant leaves
either the old or the new artifact at `NAME`, or (between the two renames) the old one aside,
which the next build, `llmc run` or `llmc inspect` of `NAME` moves back.

Both kinds of directory carry a marker file (`.llmc-staging`) naming the process that made them.
Only a directory with that marker, whose process is gone, is ever deleted or restored by a later
build: llmc deletes nothing it did not create. The output itself may be replaced only when it is
an llmc artifact holding nothing but the files its manifest lists.

Imports no torch: `llmc run` calls `recover` in a process that never loads it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import socket
import time
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec

from llmc.artifacts.manifest import MANIFEST_NAME
from llmc.errors import BadInputError
from llmc.logs import get_logger

log = get_logger("llmc.artifacts")

MARKER_NAME = ".llmc-staging"
STAGE_INFIX = ".llmc-staging-"
ASIDE_INFIX = ".llmc-old-"

# A marker is a few hundred bytes of JSON; anything larger was not written by llmc.
_MAX_MARKER_BYTES = 4096
# Same bound as the reader's: a manifest lists every tensor, and even a 1T-parameter model's stays
# far below this; a larger manifest.json is not llmc's, so the directory is not replaced.
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# An empty directory of llmc's naming is left when a build is killed between deleting a marker and
# the rmdir that follows; a stage's is removed once older than this. Younger, it may be a stage that
# a running build created a moment ago and is about to mark. A moved-aside artifact is marked before
# it is moved aside, so an empty unmarked one can only be the end of a deletion: removed at once.
_EMPTY_GRACE_S = 60
# Files named in the refusal message: enough to recognise the folder, short enough to read.
_SHOWN_FILES = 5


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a new directory gets under this process's umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def _umask() -> int:
    # /proc reads the umask without changing it (os.umask can only set it, racing other threads).
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def check_output(out_dir: Path) -> None:
    """Refuse an output `llmc build` must not replace, before any slow work.

    Allowed: a path that does not exist, an empty directory, or an llmc artifact holding only the
    files its manifest lists (a marker llmc left there is tolerated). Anything else is the user's.
    """
    out_dir = out_dir.absolute()
    if out_dir.name in ("", ".", ".."):
        raise BadInputError(f"-o {out_dir} is not a directory llmc can create or replace; choose a new folder")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise BadInputError(f"output path {out_dir} exists and is not a directory; choose another -o")
    if not out_dir.exists():
        return
    try:
        top = sorted(p.name for p in itertools.islice(out_dir.iterdir(), _SHOWN_FILES + 1))
        if not top:
            return
        listed = _manifest_files(out_dir)
        if listed is None:
            shown = ", ".join(top[:_SHOWN_FILES]) + (", ..." if len(top) > _SHOWN_FILES else "")
            raise BadInputError(
                f"output directory {out_dir} is not empty and is not an llmc artifact (it holds {shown}); "
                "llmc build replaces only an earlier artifact: choose a new or empty folder for -o"
            )
        unlisted = _unlisted(out_dir, listed | {MANIFEST_NAME, MARKER_NAME})
    except OSError as exc:
        raise BadInputError(f"cannot read the output directory {out_dir} ({exc}); choose another -o") from exc
    if unlisted:
        shown = ", ".join(unlisted[:_SHOWN_FILES]) + (", ..." if len(unlisted) > _SHOWN_FILES else "")
        raise BadInputError(
            f"output directory {out_dir} is an llmc artifact but also holds files its manifest does not list "
            f"({shown}); move them out or choose another -o, so that replacing the artifact loses nothing"
        )


def _unlisted(root: Path, listed: set[str]) -> list[str]:
    """Entries under `root` (symlinks not followed) that are neither listed files nor folders holding
    them, relative and '/'-separated; the walk stops once there are enough to name."""
    folders = {parent.as_posix() for name in listed for parent in PurePosixPath(name).parents}
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        base = Path(dirpath)
        for name in sorted(dirnames):
            relative = (base / name).relative_to(root).as_posix()
            if (base / name).is_symlink() or relative not in folders:
                dirnames.remove(name)  # not descended: the folder itself is named
                found.append(relative)
        found.extend(r for name in filenames if (r := (base / name).relative_to(root).as_posix()) not in listed)
        if len(found) > _SHOWN_FILES:
            break
    return sorted(found)


def _raise(error: OSError) -> None:
    raise error


def _manifest_files(root: Path) -> set[str] | None:
    """The files an llmc manifest in `root` lists, or None when `root` holds no llmc manifest.

    Any format version counts (an artifact of an older llmc may be rebuilt in place), so only the
    fields every version has are read."""
    path = root / MANIFEST_NAME
    if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_MANIFEST_BYTES:
        return None
    try:
        body: Any = msgspec.json.decode(path.read_bytes())
    except (msgspec.DecodeError, OSError, RecursionError):  # RecursionError: untyped JSON nested deeply
        return None
    if not isinstance(body, dict) or not isinstance(body.get("format_version"), int):
        return None
    files, build = body.get("files"), body.get("build")
    if not isinstance(files, list) or not isinstance(build, dict) or "llmc_version" not in build:
        return None
    listed = {f.get("path") for f in files if isinstance(f, dict)}
    if not all(isinstance(p, str) for p in listed):
        return None
    return {p for p in listed if isinstance(p, str)}


def new_stage(out_dir: Path) -> Path:
    """Create the marked staging directory beside `out_dir` (mode per the umask)."""
    name = f".{out_dir.name}{STAGE_INFIX}{secrets.token_hex(4)}"
    stage = out_dir.parent / name
    try:
        stage.mkdir(mode=0o700)  # opened up per the umask at commit, once complete
        _write_marker(stage, "stage", out_dir.name)
    except OSError as exc:
        raise BadInputError(
            f"cannot create the staging directory {stage} beside the output ({exc}); "
            "choose an -o whose parent folder is writable"
        ) from exc
    return stage


def _write_marker(directory: Path, role: str, target: str) -> None:
    body = {
        "llmc": "staging",
        "role": role,  # "stage": an unfinished build; "old": a replaced artifact being deleted
        "target": target,
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
        "host": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fd = os.open(directory / MARKER_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    with os.fdopen(fd, "wb") as fh:
        fh.write(msgspec.json.encode(body))


def _read_marker(directory: Path) -> dict[str, Any] | None:
    path = directory / MARKER_NAME
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_MARKER_BYTES:
            return None
        body: Any = msgspec.json.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(body, dict) or body.get("llmc") != "staging" or not isinstance(body.get("pid"), int):
        return None
    return body


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so count from its closing parenthesis.
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_gone(marker: dict[str, Any]) -> bool:
    """Whether the process that wrote the marker has ended (False when that cannot be known)."""
    if marker.get("host") != socket.gethostname():
        return False  # another machine's build, on a shared filesystem
    pid = marker["pid"]
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = marker.get("start")
    return start is not None and _start_time(pid) not in (None, start)


def recover(out_dir: Path, *, sweep: bool = True) -> None:
    """Finish what killed builds left beside `out_dir`: put a moved-aside artifact back where it
    was when nothing replaced it, then (with `sweep`) delete stale marked directories: stages of
    any output in that folder, moved-aside artifacts whose output exists. Never touches unmarked
    directories, nor those of a build still running."""
    out_dir = out_dir.absolute()
    parent = out_dir.parent
    if out_dir.name in ("", ".", "..") or not parent.is_dir():
        return
    try:
        candidates = sorted(p for p in parent.iterdir() if STAGE_INFIX in p.name or ASIDE_INFIX in p.name)
    except OSError:
        return
    stray = _read_marker(out_dir) if sweep and out_dir.is_dir() and not out_dir.is_symlink() else None
    if stray is not None and _owner_gone(stray):
        (out_dir / MARKER_NAME).unlink(missing_ok=True)  # a build was killed just before or after a rename
    for path in candidates:
        if path.is_symlink() or not path.is_dir():
            continue
        marker = _read_marker(path)
        if marker is None and sweep:
            _remove_if_old_and_empty(path, 0 if ASIDE_INFIX in path.name else _EMPTY_GRACE_S)
        if marker is None or not _owner_gone(marker):
            continue
        name = _aside_target(path, marker)
        target = parent / name if name is not None else None
        if marker.get("role") == "old" and target is not None and not target.exists():
            _restore(path, target)
        elif sweep:
            log.info("build.swept_stale", path=str(path), role=marker.get("role"))
            try:
                remove_marked(path)
            except OSError as exc:  # another user's, or a read-only folder: leave it, build anyway
                log.warning("build.sweep_failed", path=str(path), error=str(exc))


def _aside_target(aside: Path, marker: dict[str, Any]) -> str | None:
    """The name a moved-aside artifact goes back to: its marker's `target`, only where that is a
    plain name in the same folder and the one the aside's own name was made from
    (`.NAME.llmc-old-XXXX`). A marker is a file anyone can write: an absolute path or `..` there
    would have this move a folder anywhere."""
    name = marker.get("target")
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        return None
    return name if aside.name.startswith(f".{name}{ASIDE_INFIX}") else None


def _remove_if_old_and_empty(path: Path, grace_s: float) -> None:
    with contextlib.suppress(OSError):  # not empty (someone's folder), or gone already
        if time.time() - path.stat().st_mtime >= grace_s:
            path.rmdir()  # fails unless empty: it can hold nothing of anyone's


def _restore(aside: Path, target: Path) -> None:
    """Move an artifact a killed build had moved aside back to its place."""
    if _manifest_files(aside) is None:
        return  # not a complete artifact (its deletion had begun): leave it for a person to look at
    try:
        aside.rename(target)
        (target / MARKER_NAME).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("build.restore_failed", path=str(target), source=str(aside), error=str(exc))
        return
    log.warning("build.restored", path=str(target), source=str(aside))


def remove_marked(directory: Path) -> None:
    """Delete a directory llmc made, its marker last: a process killed midway leaves it marked,
    so the next build can still tell it is llmc's and finish the job."""
    for entry in list(directory.iterdir()):
        if entry.name == MARKER_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            _remove_tree(entry)
        else:
            entry.unlink()
    (directory / MARKER_NAME).unlink(missing_ok=True)
    directory.rmdir()


def _remove_tree(path: Path) -> None:
    for entry in list(path.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            _remove_tree(entry)
        else:
            entry.unlink()
    path.rmdir()


def publish(stage: Path, out_dir: Path) -> None:
    """Swap the complete `stage` in as `out_dir`, keeping an artifact at `out_dir` at every instant.

    Order: sync the stage; open its modes per the umask; mark the old artifact and rename it
    aside; rename the stage in; drop the stage's marker; delete the old artifact, marker last."""
    check_output(out_dir)  # it may have changed during the build
    _open_modes(stage)
    _sync_tree(stage)
    aside: Path | None = None
    if out_dir.exists() and any(out_dir.iterdir()):
        aside = out_dir.parent / f".{out_dir.name}{ASIDE_INFIX}{secrets.token_hex(4)}"
        try:
            _write_marker(out_dir, "old", out_dir.name)  # killed here: a stray marker, tolerated and cleared
            out_dir.rename(aside)
        except OSError as exc:
            with contextlib.suppress(OSError):
                (out_dir / MARKER_NAME).unlink(missing_ok=True)
            raise BadInputError(
                f"cannot move the earlier artifact {out_dir} aside ({exc}); make it and its folder writable"
            ) from exc
    # rename() replaces an empty directory atomically, and fails on a non-empty one: a concurrent
    # build that committed first is never overwritten.
    try:
        stage.rename(out_dir)
    except OSError as exc:
        if aside is not None:
            aside.rename(out_dir)
            (out_dir / MARKER_NAME).unlink(missing_ok=True)
        raise BadInputError(
            f"cannot move the new artifact into {out_dir} ({exc}); is another build writing it?"
        ) from exc
    (out_dir / MARKER_NAME).unlink()
    _sync_dir(out_dir.parent)
    if aside is not None:
        remove_marked(aside)


def _open_modes(stage: Path) -> None:
    """Give every staged file and folder the umask's mode: some writers (safetensors) create 0600
    files, but an artifact is meant to be shared like any other file the user makes."""
    files, dirs = file_mode(), dir_mode()
    for dirpath, _dirnames, filenames in os.walk(stage):
        base = Path(dirpath)
        os.chmod(base, dirs)
        for name in filenames:
            if not (base / name).is_symlink():
                os.chmod(base / name, files)


def _sync_tree(root: Path) -> None:
    """Flush the staged files to disk before they are renamed in: after a power loss a rename can
    otherwise survive while the data it points to does not."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(Path(dirpath))


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
