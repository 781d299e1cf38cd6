"""Logs: a failure's traceback reaches the log, and `--log-level` is honoured wherever it is given."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from click.testing import CliRunner

from llmc import cli
from llmc.logs import configure, get_logger, granian_logging


@pytest.fixture
def llmc_logger() -> Iterator[logging.Logger]:
    """llmc's logger, put back as it was afterwards (configure replaces its handlers)."""
    logger = logging.getLogger("llmc")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_exception_logs_its_traceback(llmc_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure("info")
    try:
        {}["missing"]
    except KeyError:
        get_logger("llmc.test").exception("test.failed", error="KeyError")
    text = stream.getvalue()
    first, *rest = text.splitlines()
    assert first.endswith('ERROR llmc.test test.failed error="KeyError"')
    assert rest[0] == "Traceback (most recent call last):"
    assert "KeyError: 'missing'" in text


@pytest.mark.parametrize(
    ("before", "after", "level"),
    [
        ([], [], logging.WARNING),
        (["--log-level", "debug"], [], logging.DEBUG),
        ([], ["--log-level", "ERROR"], logging.ERROR),
        (["--log-level", "error"], ["--log-level", "debug"], logging.DEBUG),  # the later one wins
        ([], ["-v"], logging.INFO),  # one step more verbose than inspect's default, warning
        ([], ["-vv"], logging.DEBUG),
        (["-v"], ["-v"], logging.DEBUG),  # counted before and after the subcommand
        ([], ["-q"], logging.ERROR),
        ([], ["--quiet", "-qqq"], logging.CRITICAL),  # no quieter than critical
        (["-q"], ["--log-level", "info"], logging.INFO),  # --log-level names the level outright
    ],
)
def test_log_level_before_or_after_the_subcommand(
    llmc_logger: logging.Logger, before: list[str], after: list[str], level: int
) -> None:
    result = CliRunner().invoke(cli.main, [*before, "inspect", "/nonexistent-artifact", *after])
    assert result.exit_code == 2, result.output  # no such directory: the options themselves were accepted
    assert llmc_logger.level == level


def test_run_hands_the_level_to_the_server(
    llmc_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import llmc.runtime.server

    seen: list[str] = []

    def fake_serve(config: Any) -> None:
        seen.append(config.log_level)

    def no_exit(code: int) -> NoReturn:
        raise SystemExit(code)

    monkeypatch.setattr(llmc.runtime.server, "serve", fake_serve)
    monkeypatch.setattr(cli, "_exit_without_finalizing", no_exit)
    runner = CliRunner()
    assert runner.invoke(cli.main, ["run", str(tmp_path)]).exit_code == 0
    assert runner.invoke(cli.main, ["run", str(tmp_path), "--log-level", "warning"]).exit_code == 0
    assert runner.invoke(cli.main, ["--log-level", "error", "run", str(tmp_path)]).exit_code == 0
    assert runner.invoke(cli.main, ["serve", str(tmp_path), "-q"]).exit_code == 0  # no request lines
    assert runner.invoke(cli.main, ["run", str(tmp_path), "-v"]).exit_code == 0
    assert runner.invoke(cli.main, ["-q", "serve", str(tmp_path), "-q"]).exit_code == 0
    assert seen == ["info", "warning", "error", "warning", "debug", "error"]
    assert runner.invoke(cli.main, ["run", str(tmp_path), "--log-level", "loud"]).exit_code == 2


def test_granian_lines_in_llmc_format_on_stderr() -> None:
    """Granian's own lines: llmc's format, stderr, its start-up notices only at debug, and never
    "Embedded server is experimental!" (llmc embeds it on purpose)."""
    import logging.config

    level, config = granian_logging("info")
    assert level == "warning"  # server.ready says what granian's info lines say
    assert granian_logging("debug")[0] == "debug" and granian_logging("error")[0] == "error"
    stream = io.StringIO()
    config["handlers"]["stderr"]["stream"] = stream
    logger = logging.getLogger("_granian")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        logging.config.dictConfig(config)
        logger.setLevel(logging.INFO)
        logger.warning("Embedded server is experimental!")
        logger.info("Listening at: http://127.0.0.1:2000")
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith(" INFO granian Listening at: http://127.0.0.1:2000"), lines
