"""llmc's top-level folders never import as top-level packages: not in the test process, not in the
processes it starts, not in the benchmarks (tests/import_hygiene.py says why)."""

from __future__ import annotations

import os
import subprocess
import sys

from llmc.tests.import_hygiene import REPO_ROOT, SHADOWING_NAMES, shadowed_names

CHILD_TIMEOUT_S = 120  # a cold Python import of llmc on a loaded 2-core CI machine


def test_no_repository_folder_resolves_as_a_top_level_package() -> None:
    assert shadowed_names() == {}
    assert all(os.path.realpath(entry or ".") != str(REPO_ROOT) for entry in sys.path), sys.path


def test_the_check_itself_sees_a_shadowing_root() -> None:
    # Started the way a careless script would be (the working directory on sys.path), the check
    # reports every shadowing folder: it can fail.
    output = _child("-m", "llmc.tests.import_hygiene", safe_path=False)
    reported = {line.split("=", 1)[0] for line in output.splitlines()}
    assert reported == set(SHADOWING_NAMES), output


def test_child_processes_started_from_the_repository_root_are_clean() -> None:
    # Servers and CLI runs in the tests start as `python -m llmc ...` in the inherited environment.
    assert _child("-m", "llmc.tests.import_hygiene") == ""


def test_benchmarks_run_from_the_repository_root_are_clean() -> None:
    code = (
        "import os, llmc.benchmarks, llmc.tests.import_hygiene as h; "
        "print(h.shadowed_names(), os.environ['PYTHONSAFEPATH'])"
    )
    assert _child("-c", code, safe_path=False).strip() == "{} 1"


def _child(*args: str, safe_path: bool = True) -> str:
    """The stdout of `python ARGS` started in the repository root, in this process's environment
    (with PYTHONSAFEPATH, which the test session sets) or without PYTHONSAFEPATH."""
    env = {key: value for key, value in os.environ.items() if safe_path or key != "PYTHONSAFEPATH"}
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=True,
    )
    return result.stdout
