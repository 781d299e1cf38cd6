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
    env = {**os.environ, "PYTHONSAFEPATH": ""}
    env.pop("PYTHONSAFEPATH")
    result = subprocess.run(
        [sys.executable, "-m", "llmc.tests.import_hygiene"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=True,
    )
    reported = {line.split("=", 1)[0] for line in result.stdout.splitlines()}
    assert reported == set(SHADOWING_NAMES), result.stdout


def test_child_processes_started_from_the_repository_root_are_clean() -> None:
    # Servers and CLI runs in the tests start as `python -m llmc ...` in the inherited environment.
    result = subprocess.run(
        [sys.executable, "-m", "llmc.tests.import_hygiene"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=True,
    )
    assert result.stdout == ""


def test_benchmarks_run_from_the_repository_root_are_clean() -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONSAFEPATH"}
    code = (
        "import os, llmc.benchmarks, llmc.tests.import_hygiene as h; "
        "print(h.shadowed_names(), os.environ['PYTHONSAFEPATH'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=True,
    )
    assert result.stdout.strip() == "{} 1"
