"""`llmc build -o DIR` never destroys user data: it refuses what is not an earlier artifact, replaces
an artifact so that a kill at any instant leaves the old or the new one, sweeps only its own stale
staging directories, and writes files with the umask's modes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from llmc.artifacts import staging
from llmc.artifacts.reader import Artifact
from llmc.builder.build import BuildOptions, build
from llmc.errors import BadInputError

# A CLI build of the tiny model: Python and torch start in ~3 s, the build itself takes ~0.3 s.
_CLI_TIMEOUT_S = 120
# Kill-loop iterations: half at a random instant of the whole run, half during the build proper.
_KILLS = 6


def _llmc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmc", *args], capture_output=True, text=True, timeout=_CLI_TIMEOUT_S, cwd=cwd
    )


def _build(src: Path, out: Path, name: str = "tiny") -> None:
    build(BuildOptions(model=str(src), gguf_file=None, weights=None, output=out, name=name, cpu_kernels=False))


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under `root`: its mode and its bytes (or a symlink's target)."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[key] = (info.st_mode, os.readlink(path))
        elif path.is_file():
            found[key] = (info.st_mode, path.read_bytes())
        else:
            found[key] = (info.st_mode, "dir")
    return found


def _user_folder(root: Path) -> Path:
    root.mkdir()
    (root / "important.txt").write_text("precious\n")
    (root / "notes").mkdir()
    (root / "notes" / "a.bin").write_bytes(os.urandom(1000))
    (root / "link").symlink_to("important.txt")
    return root


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _mark(directory: Path, role: str, target: str, pid: int, start: str | None = None) -> None:
    body = {"llmc": "staging", "role": role, "target": target, "pid": pid, "start": start, "host": socket.gethostname()}
    (directory / staging.MARKER_NAME).write_bytes(msgspec.json.encode(body))


def _model_name(artifact: Path) -> str:
    return Artifact.open(artifact, verify=True).manifest.model_name


def test_cli_refuses_a_folder_that_is_not_an_artifact(tiny_llama_dir: Path, tmp_path: Path) -> None:
    user = _user_folder(tmp_path / "project")
    before = _snapshot(user)
    result = _llmc("build", "--m", str(tiny_llama_dir), "-o", str(user), "--no-compile")
    assert result.returncode == 2, result.stderr
    assert str(user) in result.stderr and "not an llmc artifact" in result.stderr
    assert _snapshot(user) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no staging directory left either


def test_cli_refuses_dot_inside_a_user_folder(tiny_llama_dir: Path, tmp_path: Path) -> None:
    user = _user_folder(tmp_path / "project")
    before = _snapshot(tmp_path)
    result = _llmc("build", "--m", str(tiny_llama_dir), "-o", ".", "--no-compile", cwd=user)
    assert result.returncode == 2, result.stderr
    assert str(user.resolve()) in result.stderr
    assert _snapshot(tmp_path) == before


def test_refuses_parent_root_files_and_artifacts_holding_user_files(tiny_llama_dir: Path, tmp_path: Path) -> None:
    user = _user_folder(tmp_path / "project")
    (user / "sub").mkdir()
    before = _snapshot(tmp_path)
    for out in (user / "sub" / "..", Path("/"), user / "important.txt", user / "link"):
        with pytest.raises(BadInputError):
            _build(tiny_llama_dir, out)
    assert _snapshot(tmp_path) == before
    art = tmp_path / "art"
    _build(tiny_llama_dir, art)
    (art / "README.md").write_text("my notes")
    kept = _snapshot(art)
    with pytest.raises(BadInputError, match=r"README\.md"):
        _build(tiny_llama_dir, art, name="other")
    assert _snapshot(art) == kept
    (art / "README.md").unlink()
    (art / "kept" / "deeper").mkdir(parents=True)  # even an empty folder of the user's is kept
    (tmp_path / "only-folders" / "empty").mkdir(parents=True)
    for out, named in ((art, "kept"), (tmp_path / "only-folders", "empty")):
        kept = _snapshot(out)
        with pytest.raises(BadInputError, match=named):
            _build(tiny_llama_dir, out, name="other")
        assert _snapshot(out) == kept


def test_replaces_an_artifact_and_an_empty_folder(tiny_llama_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _build(tiny_llama_dir, empty, name="first")
    _build(tiny_llama_dir, empty, name="second")
    assert _model_name(empty) == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no stage, no old copy, no marker left
    assert not (empty / staging.MARKER_NAME).exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifact_files_follow_the_umask(tiny_llama_dir: Path, tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        _build(tiny_llama_dir, tmp_path / "art")
        # A stage like a compiled build's: a subfolder, and a 0600 file as safetensors writes them.
        stage = staging.new_stage(tmp_path / "unit")
        (stage / "compiled").mkdir()
        (stage / "compiled" / "decode.constants.safetensors").write_bytes(b"x")
        os.chmod(stage / "compiled" / "decode.constants.safetensors", 0o600)
        staging.publish(stage, tmp_path / "unit")
    finally:
        os.umask(previous)
    for root in (tmp_path / "art", tmp_path / "unit"):
        paths = [root, *root.rglob("*")]
        assert any(p.name.endswith(".safetensors") for p in paths)
        for path in paths:
            want = (0o777 if path.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))


def test_sweeps_only_marked_stale_directories(tiny_llama_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    _build(tiny_llama_dir, art, name="old")
    dead, other_dead = _dead_pid(), _dead_pid()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        alive_start = staging._start_time(sleeper.pid)
        made: dict[str, tuple[str, int, str | None] | None] = {
            ".art.llmc-staging-dead": ("stage", dead, None),
            ".other.llmc-staging-dead": ("stage", other_dead, None),  # another output's killed build
            ".art.llmc-staging-reused": ("stage", sleeper.pid, "1"),  # its pid now runs another program
            ".art.llmc-old-dead": ("old", dead, None),  # art exists again: this copy is garbage
            ".art.llmc-staging-alive": ("stage", sleeper.pid, alive_start),
            ".art.llmc-staging-user": None,  # no marker: someone's own folder
            ".art.llmc-old-user": None,
        }
        for name, mark in made.items():
            (tmp_path / name / "sub").mkdir(parents=True)
            (tmp_path / name / "sub" / "data.bin").write_bytes(b"data")
            if mark is not None:
                _mark(tmp_path / name, mark[0], "art", mark[1], mark[2])
        _mark(art, "old", "art", dead)  # a build killed just before moving it aside
        (tmp_path / ".art.llmc-old-emptied").mkdir()  # killed between its marker's unlink and rmdir
        os.utime(tmp_path / ".art.llmc-old-emptied", (0, 0))
        (tmp_path / ".art.llmc-staging-new").mkdir()  # a running build's, a moment before its marker
        kept = {name: _snapshot(tmp_path / name) for name in (".art.llmc-staging-alive", ".art.llmc-staging-user")}
        kept[".art.llmc-old-user"] = _snapshot(tmp_path / ".art.llmc-old-user")
        kept[".art.llmc-staging-new"] = {}
        _build(tiny_llama_dir, art, name="new")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["art", *kept])
        for name, snapshot in kept.items():
            assert _snapshot(tmp_path / name) == snapshot
        assert _model_name(art) == "new" and not (art / staging.MARKER_NAME).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_emptied_aside_is_removed_at_once_and_a_fresh_empty_stage_is_kept(tmp_path: Path) -> None:
    """A build killed between deleting an old artifact's marker and its rmdir leaves an empty,
    unmarked `.NAME.llmc-old-*`: only that can make one (asides are marked before they are moved),
    so the next build removes it without waiting. An empty unmarked stage may be a running
    build's, a moment before its marker: kept until the grace period has passed."""
    aside = tmp_path / f".art{staging.ASIDE_INFIX}0123abcd"
    stage = tmp_path / f".art{staging.STAGE_INFIX}0123abcd"
    aside.mkdir()
    stage.mkdir()
    staging.recover(tmp_path / "art")
    assert not aside.exists()
    assert stage.is_dir()
    old = time.time() - staging._EMPTY_GRACE_S - 1
    os.utime(stage, (old, old))
    staging.recover(tmp_path / "art")
    assert not stage.exists()


def test_cli_restores_an_artifact_a_killed_build_moved_aside(tiny_llama_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    _build(tiny_llama_dir, art, name="old")
    aside = tmp_path / ".art.llmc-old-1234abcd"
    _mark(art, "old", "art", _dead_pid())
    art.rename(aside)
    result = _llmc("inspect", str(art), "--verify")
    assert result.returncode == 0, result.stderr
    assert "model_name: old" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert not (art / staging.MARKER_NAME).exists()


def test_a_marker_cannot_send_a_moved_aside_folder_elsewhere(tmp_path: Path) -> None:
    """A marker is a file anyone can write: its target had a folder beside the given path moved
    to any absolute path, or up with `..`, by any command that recovers (inspect, run, build)."""
    outside = tmp_path / "outside"
    here = tmp_path / "here"
    here.mkdir()
    targets = {
        ".evil.llmc-old-0001": str(outside),  # absolute
        ".evil2.llmc-old-0002": "../outside",
        ".evil3.llmc-old-0003": "other",  # a plain name, but not the one the aside's name says
        ".good.llmc-old-0004": "good",  # a genuine one: restored
    }
    for name, target in targets.items():
        (here / name).mkdir()
        (here / name / "manifest.json").write_text(
            '{"format_version": 13, "files": [], "build": {"llmc_version": "0.1.0"}}'
        )
        _mark(here / name, "old", target, _dead_pid(), "bogus")
    staging.recover(here / "no_such_artifact", sweep=False)
    assert not outside.exists() and not (here / "other").exists()
    assert sorted(p.name for p in here.iterdir()) == sorted([*list(targets)[:3], "good"])


class _Killed(BaseException):
    """Stands for SIGKILL at one step of publish: nothing after it runs, no cleanup either."""


@pytest.fixture
def kill_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], list[str]]]:
    """Make the n-th filesystem change publish makes raise _Killed; returns the steps done."""
    steps: list[str] = []
    limit = [10**9]

    def wrap(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def step(*args: Any, **kwargs: Any) -> Any:
            if len(steps) >= limit[0]:
                raise _Killed
            steps.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, step)

    def arm(n: int) -> list[str]:
        steps.clear()
        limit[0] = n
        return steps

    for name in ("rename", "unlink", "rmdir"):
        wrap(Path, name)
    for name in ("chmod", "fsync"):
        wrap(os, name)
    wrap(staging, "_write_marker")
    yield arm
    limit[0] = 10**9


def test_publish_killed_at_every_step_leaves_the_old_or_the_new(
    tiny_llama_dir: Path, tmp_path: Path, kill_at: Callable[[int], list[str]]
) -> None:
    templates = tmp_path / "templates"
    _build(tiny_llama_dir, templates / "old", name="old")
    _build(tiny_llama_dir, templates / "new", name="new")
    seen = set()
    n = 0
    while True:
        work = tmp_path / f"run{n}"
        art = work / "art"
        work.mkdir()
        shutil.copytree(templates / "old", art)
        stage = staging.new_stage(art)
        shutil.copytree(templates / "new", stage, dirs_exist_ok=True)
        steps = kill_at(n)
        try:
            staging.publish(stage, art)
            finished = True
        except _Killed:
            finished = False
        steps = list(steps)
        kill_at(10**9)
        dead = _dead_pid()
        for marker in work.rglob(staging.MARKER_NAME):  # the killed process is gone
            body = msgspec.json.decode(marker.read_bytes())
            _mark(marker.parent, body["role"], body["target"], dead)
        if art.exists():
            seen.add(_model_name(art))
        else:  # killed between the two renames: the old artifact is aside, marked
            (aside,) = work.glob(".art.llmc-old-*")
            assert _model_name(aside) == "old"
        for empty in work.glob(".art.llmc-*"):  # killed after the marker, before the rmdir: age it
            os.utime(empty, (0, 0))
        staging.recover(art)  # what the next build does first
        assert _model_name(art) in ("old", "new"), steps
        assert [p.name for p in work.iterdir()] == ["art"], (n, steps[10:])
        if finished:
            break
        n += 1
    assert seen == {"old", "new"} and n > 5


def test_kill_loop_always_leaves_an_artifact(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """SIGKILL `llmc build` subprocesses at random instants; the output always verifies."""
    art = tmp_path / "art"
    args = ["build", "--m", str(tiny_llama_dir), "-o", str(art), "--no-compile", "--no-cpu-kernels"]
    started = time.monotonic()
    first = subprocess.Popen([sys.executable, "-m", "llmc", *args, "--name", "gen0"], stdout=subprocess.DEVNULL)
    staged_at = committed_at = None
    while first.poll() is None:  # time the run, and the build proper (from its stage to the swap)
        stages = any(tmp_path.glob(".art.llmc-staging-*"))
        if stages and staged_at is None:
            staged_at = time.monotonic()
        if not stages and staged_at is not None and committed_at is None:
            committed_at = time.monotonic()
        assert time.monotonic() - started < _CLI_TIMEOUT_S
        time.sleep(0.001)
    assert first.returncode == 0
    whole = time.monotonic() - started
    assert staged_at is not None
    building = (committed_at or time.monotonic()) - staged_at
    rng = random.Random(17)
    names = {"gen0"}
    for i in range(_KILLS):
        name = f"gen{i + 1}"
        earlier = set(tmp_path.glob(".art.llmc-staging-*"))  # stages of killed builds, swept by this one
        child = subprocess.Popen(
            [sys.executable, "-m", "llmc", *args, "--name", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if i % 2 == 0:  # anywhere in the run, stratified so the whole run is covered
            time.sleep(whole * (i // 2 + rng.random()) / (_KILLS // 2))
        else:  # once the build is writing: the staging, the swap
            deadline = time.monotonic() + _CLI_TIMEOUT_S
            while not set(tmp_path.glob(".art.llmc-staging-*")) - earlier and child.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            time.sleep(rng.random() * building * 1.2)
        child.send_signal(signal.SIGKILL)
        child.wait()
        if not art.exists():
            staging.recover(art, sweep=False)  # as `llmc run` / `llmc inspect` do
        got = _model_name(art)
        assert got in names | {name}
        names.add(name)
    last = _llmc(*args, "--name", "last")
    assert last.returncode == 0, last.stderr
    assert _model_name(art) == "last"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
