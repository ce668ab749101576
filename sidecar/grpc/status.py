"""The one place where sidecar errors become gRPC status codes."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from sidecar import errors
from sidecar.grpc.to_domain import checked

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
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Code and caller-facing message for any exception; unexpected ones are logged, not leaked."""
    if isinstance(exc, errors.SidecarError):
        for kind in type(exc).__mro__:
            if kind in CODES:
                return CODES[kind], str(exc)
    ref = uuid.uuid4().hex[:12]
    log.error("internal error (ref %s)", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the server log has the details"


def rpc_status(exc: BaseException) -> status_pb2.Status:
    """A google.rpc.Status for a per-item error on Stream."""
    code, message = status_of(exc)
    return status_pb2.Status(code=code.value[0], message=message)


def check_answer_size(answer: Message, limit: int, subject: str = "the answer") -> None:
    """Refuse an answer gRPC could not send, as the caller's to fix (gRPC itself would end
    the call with RESOURCE_EXHAUSTED, which reads as 'back off')."""
    if (size := answer.ByteSize()) > limit:
        raise errors.InvalidInputError(
            f"{subject} would be {size} bytes, over max_message_bytes {limit}: "
            "send fewer or shorter inputs, or set truncate"
        )


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


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


def translates_errors(handler: F) -> F:
    """Wrap a unary servicer method: admit the call, refuse a request that could not be
    parsed, bound the answer's size, and end every exception as a mapped status.

    The servicer holds the dataplane's Admission as `self.admission`, the size limit as
    `self.max_message_bytes` and the server's Telemetry as `self.telemetry` (each call is
    counted and timed under its RPC name, model and status code).
    """

    @wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        began = time.perf_counter()
        code = grpc.StatusCode.OK
        model = getattr(request, "model", "")
        try:
            async with self.admission.call():
                response = await handler(self, checked(request), context)
            if response is not None:
                check_answer_size(response, self.max_message_bytes)
                metadata = getattr(response, "metadata", None)
                model = getattr(metadata, "model", "") or model
            return response
        except grpc.aio.AbortError:  # a handler that aborted by itself: its code is not known
            code = grpc.StatusCode.UNKNOWN
            raise
        except errors.PROPAGATE:
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException as exc:
            code = fail(context, exc)
            return None
        finally:
            self.telemetry.answered(handler.__name__, model, code.name, time.perf_counter() - began)

    return wrapper  # type: ignore[return-value]
