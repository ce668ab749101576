"""Server-sent events that stop their source the moment the caller disconnects.

A response's writer only learns of a departed caller when a write fails, which for a
generation is the next token's step at the earliest, and never while it waits for one. So the
stream watches the connection too, and a disconnect cancels the writer: the events'
generator is closed, and with it the generation, within the step in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


async def disconnected(receive: Receive) -> None:
    """Return once the caller has gone (the request's body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """A text/event-stream response of `events`, under `span` until it ends."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        span: Span | None,
        ended: Callable[[Span | None, int], None],
    ) -> None:
        self._events = events
        self._span = span
        self._ended = ended
        self.status_code = 200
        self.background = None
        # No caching, and no buffering by a proxy between (nginx honours X-Accel-Buffering).
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def _write(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for event in self._events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Write the events until they end or the caller leaves."""
        token = None
        if self._span is not None:  # the writer's task copies this context: spans nest
            token = otel_context.attach(trace.set_span_in_context(self._span))
        try:
            async with contextlib.aclosing(self._events):
                writer = asyncio.ensure_future(self._write(send))
                watcher = asyncio.ensure_future(disconnected(receive))
                try:
                    await asyncio.wait((writer, watcher), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    watcher.cancel()
                    if not writer.done():
                        writer.cancel()
                    # The writer's own failure (a write to a closed socket) ends it quietly.
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await writer
        finally:
            if token is not None:
                otel_context.detach(token)
            self._ended(self._span, self.status_code)
