"""The bidirectional Stream: many items in flight, answered in completion order.

One reader task takes items off the wire, but only while a slot is free; an item holds
its slot until its answer is written, so a caller that sends faster than the models run,
or reads answers slower, is held back by gRPC flow control. Each item runs
as its own task; its answer, or its error, goes onto one queue that the response
generator drains. A failed item answers with `error` and the stream goes on.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

from sidecar.dataplane.service import DataPlane
from sidecar.errors import CancelledError, InvalidInputError, NotImplementedYetError
from sidecar.grpc import to_domain, to_proto
from sidecar.grpc.status import rpc_status
from sidecar.v1 import inference_pb2 as pb

_EOF = object()
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
    raise NotImplementedYetError(f"{kind} items are not available in this server version")


async def run_stream(
    dataplane: DataPlane,
    requests: AsyncIterator[pb.StreamRequest],
    max_in_flight: int,
    deadline: float | None,
) -> AsyncIterator[pb.StreamResponse]:
    """Serve one Stream call; yields responses as items complete."""
    out: asyncio.Queue[Any] = asyncio.Queue()
    slots = asyncio.Semaphore(max_in_flight)
    in_flight: dict[str, asyncio.Task[pb.StreamResponse]] = {}

    def finish(request: pb.StreamRequest, task: asyncio.Task[pb.StreamResponse]) -> None:
        # A done callback sees every ending, including a task cancelled before it started.
        if task.cancelled():
            error = CancelledError(f"item {request.id!r} was cancelled")
            response = pb.StreamResponse(id=request.id, error=rpc_status(error))
        elif (exc := task.exception()) is not None:
            response = pb.StreamResponse(id=request.id, error=rpc_status(exc))
        else:
            response = task.result()
        del in_flight[request.id]
        out.put_nowait(response)

    def refuse(request: pb.StreamRequest, exc: Exception) -> None:
        out.put_nowait(pb.StreamResponse(id=request.id, error=rpc_status(exc)))

    async def read() -> None:
        try:
            while True:
                await slots.acquire()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    slots.release()
                    break
                kind = request.WhichOneof("request")
                if kind == "cancel":
                    slots.release()
                    if (task := in_flight.get(request.id)) is not None:
                        task.cancel()
                elif kind is None:
                    refuse(
                        request,
                        InvalidInputError(
                            f"item {request.id!r} carries no request: "
                            f"set one of {', '.join(ITEM_KINDS)}"
                        ),
                    )
                elif request.id in in_flight:
                    refuse(
                        request,
                        InvalidInputError(
                            f"item id {request.id!r} is already in flight on this stream: "
                            "use a unique id for each in-flight item"
                        ),
                    )
                else:
                    task = asyncio.create_task(_dispatch(dataplane, request, kind, deadline))
                    task.add_done_callback(functools.partial(finish, request))
                    in_flight[request.id] = task
            out.put_nowait(_EOF)
        except BaseException as exc:  # the client went away: end the drain loop with it
            out.put_nowait(exc)
            raise

    reader = asyncio.create_task(read())
    finished_reading = False
    try:
        while not (finished_reading and not in_flight and out.empty()):
            item = await out.get()
            if item is _EOF:
                finished_reading = True
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
                # An answer holds its slot until gRPC has taken it: a caller that stops
                # reading answers stops the server reading requests, and memory stays bounded.
                slots.release()
    finally:
        reader.cancel()
        for task in list(in_flight.values()):
            task.cancel()
