"""Errors the server answers with an OpenAI-style body, `{"error": {"message", "type", "param", "code"}}`.

Raised anywhere in the serving layer; `app.py` turns them into responses. Messages are one line that says
what is wrong and how to fix it, as in `dllm.errors`."""
from __future__ import annotations

from http import HTTPStatus


class ApiError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, *, type: str | None = None,
                 param: str | None = None, code: str | None = None):
        message = one_line(message)
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, int(status), param, code
        self.type = type or _default_type(self.status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def one_line(text: str) -> str:
    """`text` with every character that is not printable (newlines, control characters, lone surrogates)
    escaped as repr() writes it: a message is one line, whatever a request put in it."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _default_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}.get(
        status, "internal_error" if status >= 500 else "invalid_request_error")


class QueueFullError(ApiError):
    def __init__(self, max_queue_size: int):
        super().__init__(f"too many queued requests (limit {max_queue_size}); retry later",
                         HTTPStatus.TOO_MANY_REQUESTS, code="queue_full")


class ServerClosingError(ApiError):
    def __init__(self):
        super().__init__("the server is shutting down; retry on another replica or after the restart",
                         HTTPStatus.SERVICE_UNAVAILABLE, code="server_shutting_down")


class EngineFailedError(ApiError):
    """The engine raised while decoding a batch this request was in (a bug or a device failure)."""

    def __init__(self, exc: BaseException):
        super().__init__(f"decoding failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         HTTPStatus.INTERNAL_SERVER_ERROR, code="engine_error")
