"""Structured logging: one named event per line with key=value fields.

Messages are event names, never formatted strings, so logs can be grepped and parsed.
Prompts and API keys are never passed as fields at INFO level.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

# Most verbose first, as logging orders its levels.
_LEVEL_RANK = ("debug", "info", "warning", "error", "critical")


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        # Granian's Rust side logs as `_granian` and `_granian.serve`: shown without the underscore.
        name = record.name.removeprefix("_") if record.name.startswith("_granian") else record.name
        parts = [f"{self.formatTime(record)} {record.levelname} {name} {record.getMessage()}"]
        parts += [f"{k}={json.dumps(v, default=str)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:  # `log.exception(...)`: the traceback is what the 500's "see the server log" means
            line += "\n" + self.formatException(record.exc_info)
        return line


class EventLogger:
    """A thin wrapper: `log.info("engine.started", blocks=128)`."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._logger.exception(event, extra={"fields": fields})


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def configure(level: str = "INFO") -> None:
    """Send llmc's logs to stderr (stdout is kept for machine-readable output)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    root = logging.getLogger("llmc")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


# Granian's start-up notices that say nothing to an llmc user: llmc embeds Granian on purpose
# ("Embedded server is experimental!"), and server.ready already says where it listens.
_GRANIAN_NOISE = ("Embedded server is experimental!",)


class _DropGranianNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in _GRANIAN_NOISE


def granian_logging(level: str) -> tuple[str, dict[str, Any]]:
    """(log level, logging dictConfig) for Granian's Server: its lines go to stderr in llmc's
    format, under the logger name `granian`, instead of `[INFO] ...` on stdout.

    Its own info lines (starting, listening, spawning a worker) repeat what llmc's server.ready
    says, so Granian logs at warning unless llmc logs at debug.
    """
    granian_level = "debug" if level.lower() == "debug" else max(level.lower(), "warning", key=_LEVEL_RANK.index)
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"llmc": {"()": _KeyValueFormatter}},
        "filters": {"quiet": {"()": _DropGranianNoise}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "llmc",
                "filters": ["quiet"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "_granian": {"handlers": ["stderr"], "propagate": False},
            "granian.access": {"handlers": ["stderr"], "propagate": False},
        },
    }
    return granian_level, config
