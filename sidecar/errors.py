"""The sidecar's one exception tree.

Domain code raises these; `sidecar.grpc.status` maps each class to a gRPC status code in
one table, `sidecar.http.status` to an HTTP status and an OpenAI error type in another.
Messages are written for the caller: what was wrong and how to fix it.

    SidecarError
    ├── InvalidInputError          client mistake in the request        INVALID_ARGUMENT
    │   └── TooLargeError          a request body over the size limit   (HTTP 413)
    ├── ModelNotFoundError         no model of that name                NOT_FOUND
    ├── WrongTaskError             the model does not do this task      FAILED_PRECONDITION
    ├── ModelNotReadyError         loading, failed, or shutting down    UNAVAILABLE
    ├── DeadlineExceededError      the call's deadline passed           DEADLINE_EXCEEDED
    ├── OverloadedError            a bounded queue is full              RESOURCE_EXHAUSTED
    ├── CancelledError             the caller cancelled the work        CANCELLED
    ├── NotImplementedYetError     the RPC exists but is not available  UNIMPLEMENTED
    ├── UnauthenticatedError       no valid bearer token                UNAUTHENTICATED
    ├── ModelLoadError             a model dir cannot be served         (load time only)
    │   └── ChecksumMismatchError  a file differs from its manifest
    └── ConfigError                settings that cannot work            (start-up only)

The export's own failures (ExportError, ValidationError) live in export/errors.py.
"""

from __future__ import annotations

import asyncio

# What must propagate: cancellation and interpreter exit. Any other exception, even a
# BaseException such as a Rust panic in the tokenizers library (pyo3's PanicException),
# is a fault to report for that call or that model, never a reason to stop serving.
PROPAGATE: tuple[type[BaseException], ...] = (
    asyncio.CancelledError,
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
)


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class InvalidInputError(SidecarError):
    """The request itself is wrong; retrying it unchanged cannot succeed."""


class TooLargeError(InvalidInputError):
    """The request is over a size limit; it must be made smaller to succeed."""


class ModelNotFoundError(SidecarError):
    """The request names a model this sidecar does not serve."""


class WrongTaskError(SidecarError):
    """The model exists but does a different task than the call needs."""


class ModelNotReadyError(SidecarError):
    """The model (or the server) cannot take calls right now; retry later or elsewhere."""


class DeadlineExceededError(SidecarError):
    """The call's deadline passed before its work was done."""


class OverloadedError(SidecarError):
    """A bounded queue or concurrency limit is full."""


class CancelledError(SidecarError):
    """The caller cancelled the work."""


class NotImplementedYetError(SidecarError):
    """The contract names this call but this server version does not provide it."""


class UnauthenticatedError(SidecarError):
    """The call lacks the bearer token this server requires, or carries a wrong one."""


class ModelLoadError(SidecarError):
    """A model dir cannot be served: missing files, bad manifest, failed preflight."""


class ChecksumMismatchError(ModelLoadError):
    """A file in the model dir does not match the sha256 its manifest records."""


class ConfigError(SidecarError):
    """The settings cannot work; raised at start-up, before anything is served."""
