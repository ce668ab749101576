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
item's next one is queued, so a slow reader holds back decoding instead of filling memory;
a cancel for it ends it with a last answer whose finish reason is CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from sidecar.dataplane.service import DataPlane
from sidecar.errors import CancelledError, InvalidInputError, NotImplementedYetError
from sidecar.grpc import to_domain, to_proto
from sidecar.grpc.status import check_answer_size, rpc_status, status_of
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


ITEM_KINDS = ("embed", "classify", "tokenize", "extract_entities", "rerank", "generate", "cancel")


async def _dispatch(
    dataplane: DataPlane, request: pb.StreamRequest, kind: str, deadline: float | None
) -> pb.StreamResponse:
    item_id = request.id
    if kind == "embed":
        embedded = await dataplane.embed(to_domain.embed(request.embed), deadline)
        return pb.StreamResponse(id=item_id, embed=to_proto.embed(embedded))
    if kind == "classify":
        classified = await dataplane.classify(to_domain.classify(request.classify), deadline)
        return pb.StreamResponse(id=item_id, classify=to_proto.classify(classified))
    if kind == "tokenize":
        tokens = await dataplane.tokenize(to_domain.tokenize(request.tokenize), deadline)
        return pb.StreamResponse(id=item_id, tokenize=to_proto.tokenize(tokens))
    if kind == "extract_entities":
        found = await dataplane.extract_entities(
            to_domain.extract_entities(request.extract_entities), deadline
        )
        return pb.StreamResponse(id=item_id, extract_entities=to_proto.extract_entities(found))
    if kind == "rerank":
        ranked = await dataplane.rerank(to_domain.rerank(request.rerank), deadline)
        return pb.StreamResponse(id=item_id, rerank=to_proto.rerank(ranked))
    raise NotImplementedYetError(f"{kind} items are not available in this server version")


class _StreamCall:
    """The state of one Stream call."""

    def __init__(
        self,
        dataplane: DataPlane,
        requests: AsyncIterator[pb.StreamRequest],
        limit: int,
        deadline: float | None,
        max_message_bytes: int,
    ) -> None:
        self.dataplane = dataplane
        self.requests = requests
        self.deadline = deadline
        self.max_message_bytes = max_message_bytes
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        self.slots = asyncio.Semaphore(limit)  # running, or answered and not yet written
        self.room = asyncio.Semaphore(limit)  # read and not yet started
        self.backlog: dict[str, tuple[pb.StreamRequest, str]] = {}
        self.start_order: asyncio.Queue[Any] = asyncio.Queue()
        self.running: dict[str, asyncio.Task[pb.StreamResponse]] = {}
        self.stopping: set[str] = set()  # generate items a cancel asked to end

    def error(
        self, item_id: str, exc: BaseException, holds_slot: bool, holds_room: bool = False
    ) -> None:
        response = pb.StreamResponse(id=item_id, error=rpc_status(exc))
        self.out.put_nowait(_Answer(response, holds_slot, holds_room=holds_room))

    def counted(
        self, rpc: str, model: str, began: float, task: asyncio.Task[pb.StreamResponse]
    ) -> None:
        if task.cancelled():
            code = grpc.StatusCode.CANCELLED
        elif (exc := task.exception()) is not None:
            code = status_of(exc)[0]
        else:
            code = grpc.StatusCode.OK
            answer = task.result()
            field = answer.WhichOneof("response")
            if field and field != "error":  # the model that answered, the default resolved
                model = getattr(answer, field).metadata.model or model
        self.dataplane.telemetry.answered(rpc, model, code.name, time.perf_counter() - began)

    def finish(self, item_id: str, task: asyncio.Task[pb.StreamResponse]) -> None:
        # A done callback sees every ending, including a task cancelled before it started.
        del self.running[item_id]
        self.stopping.discard(item_id)
        if task.cancelled():
            self.error(item_id, _cancelled(item_id), True)
        elif (exc := task.exception()) is not None:
            self.error(item_id, exc, True)
        else:
            try:
                # gRPC would end the whole call over one oversized answer: fail only this item.
                subject = f"the answer to item {item_id!r}"
                check_answer_size(task.result(), self.max_message_bytes, subject)
            except InvalidInputError as too_big:
                self.error(item_id, too_big, True)
            else:
                self.out.put_nowait(_Answer(task.result(), True))

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
                    self.out.put_nowait(_Answer(response, False, written))
                    await written
        except asyncio.CancelledError:
            if item_id not in self.stopping:
                raise  # the stream itself is ending
            last = to_proto.generate(generation.cancelled())
            return pb.StreamResponse(id=item_id, generate=last)
        raise AssertionError("a generation ended without a last chunk")  # pragma: no cover

    def cancel(self, item_id: str) -> None:
        if (task := self.running.get(item_id)) is not None:
            self.stopping.add(item_id)
            task.cancel()
        elif self.backlog.pop(item_id, None) is not None:
            # The waiting item's room passes to its answer.
            self.error(item_id, _cancelled(item_id), False, holds_room=True)

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
                        False,
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
                self.generate(request)
                if kind == "generate"
                else _dispatch(self.dataplane, request, kind, self.deadline)
            )
            self.running[item_id] = task
            # Each item is counted and timed like a call: Stream.<kind> under its model.
            model = getattr(request, kind).model
            task.add_done_callback(
                functools.partial(self.counted, f"Stream.{kind}", model, time.perf_counter())
            )
            task.add_done_callback(functools.partial(self.finish, item_id))

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
    max_message_bytes: int = 1 << 62,
) -> AsyncGenerator[pb.StreamResponse, None]:
    """Serve one Stream call; yields answers as items complete."""
    return _StreamCall(dataplane, requests, max_in_flight, deadline, max_message_bytes).answers()
