"""The one place where sidecar errors become gRPC status codes."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.rpc import status_pb2

from sidecar import errors
from sidecar.telemetry.logs import internal_error

log = logging.getLogger(__name__)

CODES: dict[type[errors.SidecarError], grpc.StatusCode] = {
    errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.WrongTaskError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ModelNotReadyError: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.CancelledError: grpc.StatusCode.CANCELLED,
    errors.NotImplementedYetError: grpc.StatusCode.UNIMPLEMENTED,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
}


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception (nothing logged: status_of logs what is unexpected)."""
    if isinstance(exc, errors.SidecarError):
        for kind in type(exc).__mro__:
            if kind in CODES:
                return CODES[kind]
    if isinstance(exc, grpc.aio.AbortError):  # a handler that aborted itself: code unknown
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL


def code_name(exc: BaseException) -> str:
    """The status code's name, as metrics label a call."""
    return code_of(exc).name


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Code and caller-facing message for any exception; unexpected ones are logged, not leaked."""
    code = code_of(exc)
    if code is not grpc.StatusCode.INTERNAL:
        return code, str(exc)
    return grpc.StatusCode.INTERNAL, internal_error(exc, log)


def rpc_status(exc: BaseException) -> status_pb2.Status:
    """A google.rpc.Status for a per-item error on Stream."""
    code, message = status_of(exc)
    return status_pb2.Status(code=code.value[0], message=message)


def fail(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> grpc.StatusCode:
    """Set the status mapped from exc on the call; the handler then returns without an answer.

    Not context.abort(): gRPC keeps the AbortError it raises in the call's state, in a
    reference cycle with the handler's frames and, through its __context__, with the failure's
    traceback, so the request and whatever the failure left in its frames (a refused 1 MB
    input's 140,000-token encodings) would stay in memory until the garbage collector next ran.
    """
    code, message = status_of(exc)
    context.set_code(code)
    context.set_details(message)
    return code
