"""A build's progress as one redrawn line on a terminal: phase, bar, count, rate, elapsed time and ETA.

No dependency: a carriage return redraws the line. The CLI uses it only when stderr is a terminal,
so logs, pipes and `--json` output never see it.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

# Redraw period: the elapsed time and ETA keep moving while a slow step (compiling the decode
# step takes about a minute) reports nothing; twice a second reads as live without flicker.
REFRESH_S = 0.5
BAR_WIDTH = 24  # characters of the bar itself; the whole line stays under 80 columns
_MB = 1e6  # the rate is shown in MB/s (decimal, as download and disk rates are)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


class TerminalProgress:
    """`progress(label, done, total)` for `llmc build`'s on_progress; close() ends the last line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._label: str | None = None
        self._done = 0
        self._total = 0
        self._bytes: tuple[int, int] | None = None  # (done, total) bytes of the phase, when it counts them
        self._started = 0.0
        self._width = 0  # of the line last drawn, to blank what a shorter one leaves behind
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(
        self, label: str, done: int, total: int, done_bytes: int | None = None, total_bytes: int | None = None, /
    ) -> None:
        """Draw `label`'s progress; with bytes (a phase whose steps differ in size), its MB/s and an
        ETA by bytes."""
        with self._lock:
            if label != self._label:
                self._end_line()
                self._label, self._started = label, time.monotonic()
            self._done, self._total = done, total
            self._bytes = (done_bytes, total_bytes) if done_bytes is not None and total_bytes else None
            self._draw()
            if done >= total:
                self._end_line()
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="llmc-progress", daemon=True)
            self._ticker.start()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            self._end_line()

    def line(self) -> str:
        """The line as drawn now (without the carriage return)."""
        elapsed = time.monotonic() - self._started
        total = max(self._total, 1)
        filled = BAR_WIDTH * min(self._done, total) // total
        text = f"{self._label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self._done}/{self._total}"
        if self._bytes is not None and elapsed > 0:
            text += f" {self._bytes[0] / _MB / elapsed:.0f} MB/s"
        text += f" {_clock(elapsed)}"
        if 0 < self._done < self._total:
            done, left = float(self._done), float(self._total - self._done)
            if self._bytes is not None and self._bytes[0] > 0:
                done, left = float(self._bytes[0]), float(self._bytes[1] - self._bytes[0])
            text += f" ETA {_clock(elapsed / done * max(left, 0.0))}"
        return text

    def _draw(self) -> None:
        text = self.line()
        self._stream.write("\r" + text.ljust(self._width))
        self._stream.flush()
        self._width = len(text)

    def _end_line(self) -> None:
        if self._label is not None:
            self._stream.write("\n")
            self._stream.flush()
        self._label, self._width = None, 0

    def _tick(self) -> None:
        while not self._stop.wait(REFRESH_S):
            with self._lock:
                if self._label is not None:
                    self._draw()
