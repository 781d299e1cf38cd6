"""The build's terminal progress line: one redrawn line per phase, with counts, elapsed time and ETA."""

from __future__ import annotations

import io

from llmc.builder.progress import BAR_WIDTH, TerminalProgress


def test_phases_redraw_one_line_each_and_end_with_a_newline() -> None:
    stream = io.StringIO()
    progress = TerminalProgress(stream)
    for done in range(1, 5):
        progress("quantizing weights", done, 4)
    progress("compiling the decode step", 0, 1)
    progress("compiling the decode step", 1, 1)
    progress.close()
    text = stream.getvalue()
    lines = text.split("\n")
    assert lines[-1] == ""  # the last phase's line is ended: what follows starts on a fresh line
    weights, compiling = lines[0], lines[1]
    assert weights.count("\r") >= 4 and compiling.count("\r") >= 2  # redrawn in place, not scrolled
    assert weights.rsplit("\r", 1)[-1].startswith(f"quantizing weights [{'#' * BAR_WIDTH}] 4/4 0:0")
    assert compiling.rsplit("\r", 1)[-1].startswith(f"compiling the decode step [{'#' * BAR_WIDTH}] 1/1")
    assert "quantizing weights [" + "#" * (BAR_WIDTH // 4) + "." in weights  # the bar grew from 1/4
    assert len(lines) == 3


def test_eta_while_a_phase_runs() -> None:
    stream = io.StringIO()
    progress = TerminalProgress(stream)
    progress("writing weights", 1, 3)
    line = progress.line()
    progress.close()
    assert line.startswith("writing weights [" + "#" * (BAR_WIDTH // 3) + ".") and " 1/3 0:00 ETA 0:0" in line


def test_rate_and_eta_by_bytes() -> None:
    """With byte counts the line shows MB/s, and the ETA follows the bytes, not the tensor count."""
    stream = io.StringIO()
    progress = TerminalProgress(stream)
    progress("quantizing weights", 1, 2, 3_000_000, 4_000_000)
    progress._started -= 1.0  # a second in: 3 MB/s, 1 MB left → ETA 0:00 by bytes (0:01 by tensors)
    line = progress.line()
    progress.close()
    assert line.startswith("quantizing weights [" + "#" * (BAR_WIDTH // 2) + ".")
    assert " 1/2 3 MB/s 0:01 ETA 0:00" in line
