"""Hands engine outputs to the event loop: one wake-up per batch of outputs, not one per token.

The engine thread produces an output for every running request at every step; waking the event
loop for each (a write to its self-pipe, a loop iteration) costs more than the work itself when
dozens of streams are open. Outputs are buffered and the loop is woken only when the buffer goes
from empty to non-empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class LoopDispatcher:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Any], Any]] = []

    def post(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """Called from any thread: deliver `item` to `queue` on the loop."""
        with self._lock:
            self._pending.append((queue, item))
            if len(self._pending) > 1:
                return  # a wake-up is already on its way and will take this item too
        # RuntimeError: the loop is closed because the server is shutting down.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for queue, item in items:
            queue.put_nowait(item)
