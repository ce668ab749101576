"""Server-sent events that stop their source the moment the caller disconnects.

A response's writer only learns of a departed caller when a write fails, which for a
generation is the next token's step at the earliest, and never while it waits for one. So the
stream watches the connection too, and a disconnect cancels the writing task: the events'
generator is closed, and with it the generation, within the step in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from sidecar import errors
from sidecar.http.status import CLIENT_CLOSED


async def disconnected(receive: Receive) -> None:
    """Return once the caller has gone (the request's body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


@contextlib.asynccontextmanager
async def cancelled_on_disconnect(receive: Receive) -> AsyncIterator[None]:
    """Run the block in this task, cancelled the moment the caller disconnects; it then
    raises errors.CancelledError. In this task, not another: a generation's deadline is an
    asyncio timeout, which belongs to the task that first advanced the generation."""
    task = asyncio.current_task()
    assert task is not None
    left = False

    async def watch() -> None:
        nonlocal left
        await disconnected(receive)
        left = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    except asyncio.CancelledError:
        if not left:
            raise
        task.uncancel()
        raise errors.CancelledError("the caller disconnected before the answer") from None
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


class EventStream(Response):
    """A text/event-stream response of `events`, under `span` until it ends."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        span: Span | None,
        ended: Callable[[Span | None, int], None],
        release: Callable[[], Awaitable[object]],
    ) -> None:
        self._events = events
        self._span = span
        self._ended = ended
        self._release = release  # the call's admission and generation, whatever happens
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
        status = self.status_code
        try:
            async with contextlib.aclosing(self._events), cancelled_on_disconnect(receive):
                await self._write(send)
        except errors.CancelledError:
            status = CLIENT_CLOSED
        except OSError:  # a write to a connection that is gone
            status = CLIENT_CLOSED
        finally:
            await self._release()
            if token is not None:
                otel_context.detach(token)
            self._ended(self._span, status)
