"""The one place where sidecar errors become HTTP statuses and OpenAI error objects.

OpenAI's SDKs pick their exception class from the status (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError) and
read `{"error": {"message", "type", "param", "code"}}` from the body.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sidecar import errors
from sidecar.telemetry.logs import internal_error

log = logging.getLogger(__name__)

# What a caller told to back off should wait before retrying, in seconds.
RETRY_AFTER_S = 1
# nginx's code for a client that closed the connection before the answer: counted, never sent.
CLIENT_CLOSED = 499


@dataclass(frozen=True)
class Kind:
    """How one error class answers over HTTP."""

    status: int
    type: str  # OpenAI's error type
    code: str  # a stable, machine-readable name


# Subclasses before the classes they refine: the first match in an exception's MRO wins.
KINDS: dict[type[errors.SidecarError], Kind] = {
    errors.TooLargeError: Kind(413, "invalid_request_error", "request_too_large"),
    errors.InvalidInputError: Kind(400, "invalid_request_error", "invalid_value"),
    errors.UnauthenticatedError: Kind(401, "authentication_error", "invalid_api_key"),
    errors.ModelNotFoundError: Kind(404, "invalid_request_error", "model_not_found"),
    # 400, as OpenAI answers a model that cannot serve the route (409 would read as a conflict
    # between requests, which retrying could clear).
    errors.WrongTaskError: Kind(400, "invalid_request_error", "model_wrong_task"),
    errors.OverloadedError: Kind(429, "rate_limit_error", "overloaded"),
    errors.ModelNotReadyError: Kind(503, "service_unavailable", "not_ready"),
    errors.DeadlineExceededError: Kind(504, "timeout", "deadline_exceeded"),
    errors.CancelledError: Kind(CLIENT_CLOSED, "cancelled", "cancelled"),
    errors.NotImplementedYetError: Kind(501, "not_implemented", "not_implemented"),
}
INTERNAL = Kind(500, "server_error", "internal_error")


def kind_of(exc: BaseException) -> Kind:
    """The HTTP answer for an exception (nothing logged: error_of logs what is unexpected)."""
    if isinstance(exc, errors.SidecarError):
        for cls in type(exc).__mro__:
            if cls in KINDS:
                return KINDS[cls]
    return INTERNAL


def code_name(exc: BaseException) -> str:
    """The HTTP status as metrics label a call."""
    return str(kind_of(exc).status)


def error_of(exc: BaseException) -> tuple[int, dict[str, object], dict[str, str]]:
    """Status, OpenAI error body and headers for any exception; unexpected ones are logged
    under a reference, never leaked."""
    kind = kind_of(exc)
    message = internal_error(exc, log) if kind is INTERNAL else str(exc)
    body: dict[str, object] = {
        "error": {
            "message": message,
            "type": kind.type,
            "param": getattr(exc, "param", None),
            "code": kind.code,
        }
    }
    headers = {}
    if kind.status in (429, 503):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if kind.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return kind.status, body, headers
