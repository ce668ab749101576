"""The bidirectional Stream: many items in flight, answered in completion order.

Three parts share one call. The reader takes items off the wire into a backlog of at
most `limit` items; when the backlog is full it stops reading, so gRPC flow control holds
a fast sender back. The starter runs backlog items while fewer than `limit` are running
or waiting to be written: an item holds its slot until its answer has been handed to
gRPC, so a caller that stops reading answers stops the server reading requests. The
drain loop yields answers as they complete. A cancel is read even while every slot is
busy (the backlog has room), and stops its item whether it is running or still waiting.
A failed item answers with `error` and the stream goes on; an id already in flight is a
broken stream (two answers would share one id) and ends it with INVALID_ARGUMENT, as does
an item that cannot be parsed (its id is unknown). An error the reader answers by itself
(an item with no request, a cancel of a waiting item) keeps its read-ahead room until it is
written, so a caller that never reads is held back however it fills the stream.

A generate item answers once per decode step. Each step's answer is written before the
item's next one is queued, and the generation decodes at most LOOKAHEAD steps past the
answer being written (dataplane/generation.py), so a slow reader holds back decoding instead
of filling memory, while the writes of a step's answers do not make the items miss the next
step they share; a cancel for it ends it with a last answer whose finish reason is CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from sidecar.dataplane.calls import CANCELLED, OK, Call, Calls
from sidecar.dataplane.service import DataPlane
from sidecar.errors import CancelledError, InvalidInputError, NotImplementedYetError
from sidecar.grpc import routes, to_domain, to_proto
from sidecar.grpc.envelope import grpc_calls
from sidecar.grpc.status import rpc_status
from sidecar.v1 import inference_pb2 as pb

_EOF = object()


@dataclass(frozen=True)
class _Answer:
    response: pb.StreamResponse
    holds_slot: bool
    # Set once the answer is handed to gRPC (generate steps wait for it).
    written: asyncio.Future[None] | None = None
    # An error the reader answered itself: it holds read-ahead room until written.
    holds_room: bool = False


def _cancelled(item_id: str) -> CancelledError:
    return CancelledError(f"item {item_id!r} was cancelled")


ITEM_KINDS = (*routes.BY_ITEM, "generate", "cancel")


class _StreamCall:
    """The state of one Stream call."""

    def __init__(
        self,
        dataplane: DataPlane,
        calls: Calls,
        requests: AsyncIterator[pb.StreamRequest],
        limit: int,
        deadline: float | None,
    ) -> None:
        self.dataplane = dataplane
        self.calls = calls
        self.requests = requests
        self.deadline = deadline
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        self.slots = asyncio.Semaphore(limit)  # running, or answered and not yet written
        self.room = asyncio.Semaphore(limit)  # read and not yet started
        self.backlog: dict[str, tuple[pb.StreamRequest, str]] = {}
        self.start_order: asyncio.Queue[Any] = asyncio.Queue()
        self.running: dict[str, asyncio.Task[pb.StreamResponse]] = {}
        self.stopping: set[str] = set()  # generate items a cancel asked to end

    def error(
        self, item_id: str, exc: BaseException, *, holds_slot: bool, holds_room: bool = False
    ) -> None:
        response = pb.StreamResponse(id=item_id, error=rpc_status(exc))
        self.out.put_nowait(_Answer(response, holds_slot=holds_slot, holds_room=holds_room))

    def finish(self, item_id: str, call: Call, task: asyncio.Task[pb.StreamResponse]) -> None:
        # A done callback sees every ending, including a task cancelled before it started.
        del self.running[item_id]
        self.stopping.discard(item_id)
        if task.cancelled():
            call.end(CANCELLED)
            self.error(item_id, _cancelled(item_id), holds_slot=True)
        elif (exc := task.exception()) is not None:
            call.failed(exc)
            self.error(item_id, exc, holds_slot=True)
        else:
            answer = task.result()
            field = answer.WhichOneof("response")
            metadata = getattr(answer, field).metadata if field and field != "error" else None
            try:
                # gRPC would end the whole call over one oversized answer: fail only this item.
                subject = f"the answer to item {item_id!r}"
                call.check_answer(answer.ByteSize(), metadata.model if metadata else "", subject)
            except InvalidInputError as too_big:
                call.failed(too_big)
                self.error(item_id, too_big, holds_slot=True)
            else:
                call.end(OK)
                self.out.put_nowait(_Answer(answer, holds_slot=True))

    async def generate(self, request: pb.StreamRequest) -> pb.StreamResponse:
        """Run a generate item: each step's answer goes out as it comes; returns the last."""
        item_id = request.id
        generation = self.dataplane.generate(to_domain.generate(request.generate), self.deadline)
        try:
            async with contextlib.aclosing(generation.chunks()) as chunks:
                async for chunk in chunks:
                    response = pb.StreamResponse(id=item_id, generate=to_proto.generate(chunk))
                    if chunk.finish is not None:
                        return response
                    written = asyncio.get_running_loop().create_future()
                    self.out.put_nowait(_Answer(response, holds_slot=False, written=written))
                    await written
        except asyncio.CancelledError:
            if item_id not in self.stopping:
                raise  # the stream itself is ending
            last = to_proto.generate(generation.cancelled())
            return pb.StreamResponse(id=item_id, generate=last)
        raise AssertionError("a generation ended without a last chunk")  # pragma: no cover

    async def dispatch(self, request: pb.StreamRequest, kind: str) -> pb.StreamResponse:
        """Run a unary item along its route."""
        route = routes.BY_ITEM.get(kind)
        if route is None:
            raise NotImplementedYetError(f"{kind} items are not available in this server version")
        answer = await routes.serve(route, self.dataplane, getattr(request, kind), self.deadline)
        return pb.StreamResponse(id=request.id, **{kind: answer})  # type: ignore[arg-type]

    def cancel(self, item_id: str) -> None:
        if (task := self.running.get(item_id)) is not None:
            self.stopping.add(item_id)
            task.cancel()
        elif self.backlog.pop(item_id, None) is not None:
            # The waiting item's room passes to its answer.
            self.error(item_id, _cancelled(item_id), holds_slot=False, holds_room=True)

    async def read(self) -> None:
        try:
            while True:
                await self.room.acquire()
                try:
                    request = to_domain.checked(await anext(self.requests))
                except StopAsyncIteration:
                    self.room.release()
                    break
                except DecodeError as exc:  # gRPC's own deserializer raises
                    raise to_domain.Undecodable(str(exc)).error() from None
                kind = request.WhichOneof("request")
                if kind == "cancel":
                    self.room.release()
                    self.cancel(request.id)
                elif kind is None:
                    self.error(
                        request.id,
                        InvalidInputError(
                            f"item {request.id!r} carries no request: "
                            f"set one of {', '.join(ITEM_KINDS)}"
                        ),
                        holds_slot=False,
                        holds_room=True,
                    )
                elif request.id in self.running or request.id in self.backlog:
                    raise InvalidInputError(
                        f"item id {request.id!r} is already in flight on this stream: "
                        "ids must be unique among in-flight items"
                    )
                else:
                    self.backlog[request.id] = (request, kind)
                    self.start_order.put_nowait(request.id)
            self.start_order.put_nowait(_EOF)
        except BaseException as exc:  # a broken stream or a departed client ends the call
            self.out.put_nowait(exc)
            raise

    async def start(self) -> None:
        while True:
            await self.slots.acquire()
            item_id = await self.start_order.get()
            if item_id is _EOF:
                self.slots.release()
                self.out.put_nowait(_EOF)
                return
            entry = self.backlog.pop(item_id, None)
            if entry is None:  # cancelled while waiting
                self.slots.release()
                continue
            self.room.release()
            request, kind = entry
            task = asyncio.create_task(
                self.generate(request) if kind == "generate" else self.dispatch(request, kind)
            )
            self.running[item_id] = task
            # Each item is counted and timed like a call: Stream.<kind> under its model.
            call = self.calls.item(f"Stream.{kind}", getattr(request, kind).model)
            task.add_done_callback(functools.partial(self.finish, item_id, call))

    async def answers(self) -> AsyncGenerator[pb.StreamResponse, None]:
        helpers = [asyncio.create_task(self.read()), asyncio.create_task(self.start())]
        finished = False
        try:
            while not (finished and not self.running and self.out.empty()):
                item = await self.out.get()
                if item is _EOF:
                    finished = True
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item.response
                    if item.written is not None and not item.written.done():
                        item.written.set_result(None)
                    if item.holds_slot:
                        self.slots.release()
                    if item.holds_room:
                        self.room.release()
        finally:
            for task in [*helpers, *self.running.values()]:
                task.cancel()


def run_stream(
    dataplane: DataPlane,
    requests: AsyncIterator[pb.StreamRequest],
    max_in_flight: int,
    deadline: float | None,
    calls: Calls | None = None,
) -> AsyncGenerator[pb.StreamResponse, None]:
    """Serve one Stream call; yields answers as items complete, each counted by `calls`."""
    calls = calls or grpc_calls(dataplane)
    return _StreamCall(dataplane, calls, requests, max_in_flight, deadline).answers()
