"""Mapping from llmc errors to OpenAI-style error responses."""

from __future__ import annotations

import msgspec

from llmc.errors import ErrorKind, LlmcError
from llmc.runtime.api.protocol import ErrorBody, ErrorResponse


class HttpError(LlmcError):
    """An error with an explicit HTTP status (404 unknown model, 413 body too large, ...)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status = status
        self.code = code


_STATUS = {
    ErrorKind.BAD_INPUT: 400,
    ErrorKind.BAD_MODEL: 400,
    ErrorKind.BAD_ARTIFACT: 500,
    ErrorKind.OUT_OF_RESOURCES: 503,
    ErrorKind.INTERNAL: 500,
}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    502: "upstream_error",  # a service the server calls (the --vision-proxy caption endpoint) failed
}


def error_response(error: LlmcError) -> tuple[int, bytes]:
    status = error.status if isinstance(error, HttpError) else _STATUS[error.kind]
    code = error.code if isinstance(error, HttpError) else None
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = ErrorResponse(ErrorBody(message=error.message, type=kind, param=error.param, code=code))
    return status, msgspec.json.encode(body)
