"""The envelope around every call, whatever the transport: admission, answer size, outcome.

A unary call, a Generate call and a Stream item each open a Call and end it exactly once
with the code its transport answered; the call is then counted and timed under its name,
the model that answered (a default resolved) and that code. A transport gives the mapping
from exceptions to its codes, so the envelope never needs to know what the codes are.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from sidecar import errors
from sidecar.dataplane.admission import Admission
from sidecar.telemetry.observer import Telemetry

OK = "OK"
CANCELLED = "CANCELLED"


class Call:
    """One call or Stream item in progress."""

    def __init__(self, calls: Calls, name: str, model: str) -> None:
        self._calls = calls
        self.name = name  # "Embed", "Stream.embed", "/v1/embeddings"
        self.model = model  # as asked; the answering model once known
        self._began = time.perf_counter()
        self._ended = False

    def check_answer(self, size: int, model: str = "", subject: str = "the answer") -> None:
        """An answer of `size` bytes from `model`: refused as the caller's to fix when the
        transport could not send it (gRPC would end the call with RESOURCE_EXHAUSTED, which
        reads as 'back off', for a request that will never fit)."""
        self.model = model or self.model
        limit = self._calls.max_answer_bytes
        if size > limit:
            raise errors.InvalidInputError(
                f"{subject} would be {size} bytes, over max_message_bytes {limit}: "
                "send fewer or shorter inputs, or set truncate"
            )

    def end(self, code: str) -> None:
        """Count and time the call under `code` (only the first end counts)."""
        if self._ended:
            return
        self._ended = True
        elapsed = time.perf_counter() - self._began
        calls = self._calls
        calls.telemetry.answered(self.name, self.model, code, elapsed, calls.transport)

    def failed(self, exc: BaseException) -> None:
        """End the call with the code the transport maps `exc` to."""
        calls = self._calls
        self.end(calls.cancelled if isinstance(exc, errors.PROPAGATE) else calls.code_of(exc))


class Calls:
    """Opens Calls for one transport."""

    def __init__(
        self,
        admission: Admission,
        telemetry: Telemetry,
        max_answer_bytes: int,
        code_of: Callable[[BaseException], str],
        transport: str = "grpc",
        ok: str = OK,
        cancelled: str = CANCELLED,
    ) -> None:
        self.admission = admission
        self.transport = transport  # the metrics' transport label
        self.ok = ok  # the transport's code for an answered call
        self.cancelled = cancelled  # and for one its caller left
        self.telemetry = telemetry
        self.max_answer_bytes = max_answer_bytes
        self.code_of = code_of  # the transport's code for an exception, logged nowhere

    def item(self, name: str, model: str) -> Call:
        """A Stream item: admitted with its stream, ended by whoever sees it finish."""
        return Call(self, name, model)

    @asynccontextmanager
    async def call(self, name: str, model: str, *, counted: bool = True) -> AsyncIterator[Call]:
        """Admit a call for the block and end it with how the block ended.

        `counted=False` admits without counting (a Stream call: its items are counted).
        """
        call = Call(self, name, model)
        try:
            async with self.admission.call():
                yield call
        except BaseException as exc:
            if counted:
                call.failed(exc)
            raise
        if counted:
            call.end(self.ok)
