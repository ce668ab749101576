"""Misuse of Stream: an id sent again while in flight, a half-close before any answer is
read, and a reader that never reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from sidecar.grpc.envelope import grpc_calls
from sidecar.grpc.stream import _StreamCall
from sidecar.server import SidecarServer
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.integration.bad_input import INVALID, collect, expect, still_serving


async def test_duplicate_ids_end_the_stream_only_while_in_flight(
    inference: InferenceStub,
) -> None:
    # One after the other: the first answer is read before the id comes again, so it is free.
    call = inference.Stream()
    for round_ in range(3):
        await call.write(pb.StreamRequest(id="same", tokenize=pb.TokenizeRequest(inputs=["x"])))
        answer = await call.read()
        assert (answer.id, answer.WhichOneof("response")) == ("same", "tokenize"), round_
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    # Twice while the first is still running: the stream ends, the message says why.
    busy = ["keep the first item busy for a while"] * 32
    items = [
        pb.StreamRequest(id="twice", embed=pb.EmbedRequest(inputs=busy)),
        pb.StreamRequest(id="twice", embed=pb.EmbedRequest(inputs=["x"])),
    ]
    await expect(
        collect(inference.Stream(iter(items))),
        INVALID,
        "item id 'twice' is already in flight on this stream",
        "ids must be unique among in-flight items",
    )
    await still_serving(inference)


async def test_half_close_mid_stream_answers_every_item_then_ends_ok(
    inference: InferenceStub,
) -> None:
    call = inference.Stream()
    sent = []
    for i in range(12):  # three times stream_max_in_flight: most wait in the backlog
        item_id = f"h{i}"
        if i % 4 == 3:
            request = pb.StreamRequest(id=item_id, embed=pb.EmbedRequest(inputs=[" "]))
        else:
            request = pb.StreamRequest(id=item_id, embed=pb.EmbedRequest(inputs=[f"text {i}"] * 8))
        await call.write(request)
        sent.append(item_id)
    await call.done_writing()  # before a single answer was read
    answers = {}
    async for answer in call:
        answers[answer.id] = answer.WhichOneof("response")
    assert sorted(answers) == sorted(sent)
    assert [i for i, kind in answers.items() if kind == "error"] == ["h3", "h7", "h11"]
    assert await call.code() == grpc.StatusCode.OK
    await still_serving(inference)


async def test_a_reader_that_never_reads_holds_the_server_back(server: SidecarServer) -> None:
    """Errors the reader answers by itself (no request; cancels of waiting items) keep their
    read-ahead room until written: a caller that floods them and reads nothing is held back
    like any other, instead of the server buffering every answer."""
    pulled = 0

    async def flood() -> AsyncIterator[pb.StreamRequest]:
        nonlocal pulled
        for i in range(20_000):
            pulled += 1
            if i % 3 == 0:
                yield pb.StreamRequest(id=f"n{i}")  # no request: an error answer
            elif i % 3 == 1:
                yield pb.StreamRequest(id=f"w{i}", embed=pb.EmbedRequest(inputs=["x"]))
            else:
                yield pb.StreamRequest(id=f"w{i - 1}", cancel=pb.CancelRequest())

    limit = 4
    stream = _StreamCall(server.dataplane, grpc_calls(server.dataplane), flood(), limit, None)
    answers = stream.answers()
    await anext(answers)  # then read nothing more, as a stuck client
    await asyncio.sleep(1.0)
    try:
        assert pulled <= 4 * limit, f"{pulled} items read while none of the answers was"
        assert stream.out.qsize() <= 2 * limit
    finally:
        await answers.aclose()
