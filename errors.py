"""One error hierarchy for llmc: every failure a user can cause or fix has a kind.

The kind decides the process exit code in the CLI and the HTTP status in the server,
so callers never have to parse messages.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    BAD_INPUT = "bad_input"
    BAD_MODEL = "bad_model"
    BAD_ARTIFACT = "bad_artifact"
    OUT_OF_RESOURCES = "out_of_resources"
    INTERNAL = "internal"


# CLI exit codes per kind: distinct so CI scripts can tell "fix your flags" from "fix your model".
EXIT_CODES: dict[ErrorKind, int] = {
    ErrorKind.BAD_INPUT: 2,
    ErrorKind.BAD_MODEL: 3,
    ErrorKind.BAD_ARTIFACT: 4,
    ErrorKind.OUT_OF_RESOURCES: 5,
    ErrorKind.INTERNAL: 70,  # EX_SOFTWARE from sysexits.h
}


class LlmcError(Exception):
    """Base error. `message` says what went wrong and what to do about it."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]


class BadInputError(LlmcError):
    """The caller's flags or request are wrong."""

    kind = ErrorKind.BAD_INPUT


class BadModelError(LlmcError):
    """The source model cannot be read or is not supported."""

    kind = ErrorKind.BAD_MODEL


class BadArtifactError(LlmcError):
    """The artifact is damaged, of an unknown format version, or for another target."""

    kind = ErrorKind.BAD_ARTIFACT


class OutOfResourcesError(LlmcError):
    """Memory, KV cache or disk ran out."""

    kind = ErrorKind.OUT_OF_RESOURCES


class InternalError(LlmcError):
    """A bug in llmc: please report it."""

    kind = ErrorKind.INTERNAL
