"""The bidirectional Stream: ids, completion order, per-item errors, cancel, back-pressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from sidecar.errors import InvalidInputError
from sidecar.grpc.stream import run_stream
from sidecar.server import SidecarServer
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub


def embed(item_id: str, *texts: str) -> pb.StreamRequest:
    return pb.StreamRequest(id=item_id, embed=pb.EmbedRequest(inputs=list(texts)))


async def collect(
    inference: InferenceStub, items: list[pb.StreamRequest]
) -> dict[str, pb.StreamResponse]:
    answers: dict[str, pb.StreamResponse] = {}
    async for response in inference.Stream(iter(items)):
        assert response.id not in answers, f"{response.id} answered twice"
        answers[response.id] = response
    return answers


async def test_every_item_answered_once_with_its_own_result(inference: InferenceStub) -> None:
    texts = [f"ticket number {i} about billing" for i in range(40)]
    items = [embed(f"e{i}", text) for i, text in enumerate(texts)]
    items += [
        pb.StreamRequest(id="c", classify=pb.ClassifyRequest(model="triage", inputs=["refund"]))
    ]
    items += [pb.StreamRequest(id="t", tokenize=pb.TokenizeRequest(inputs=["hello"]))]
    answers = await collect(inference, items)
    assert set(answers) == {item.id for item in items}
    alone = await inference.Embed(pb.EmbedRequest(inputs=[texts[7]]))
    np.testing.assert_allclose(
        answers["e7"].embed.embeddings[0].values, alone.embeddings[0].values, atol=1e-5
    )
    assert answers["c"].classify.results[0].labels
    assert list(answers["t"].tokenize.results[0].tokens) == ["[CLS]", "hello", "[SEP]"]
    assert answers["e0"].embed.metadata.model == "minilm"


async def test_bad_items_get_errors_and_the_stream_goes_on(inference: InferenceStub) -> None:
    items = [
        embed("ok-1", "fine"),
        embed("empty", "   "),
        pb.StreamRequest(id="nothing"),
        pb.StreamRequest(
            id="wrong-task", classify=pb.ClassifyRequest(model="minilm", inputs=["x"])
        ),
        pb.StreamRequest(id="unknown", embed=pb.EmbedRequest(model="nope", inputs=["x"])),
        pb.StreamRequest(id="gen", generate=pb.GenerateRequest(prompt="hi")),
        embed("ok-2", "also fine"),
    ]
    answers = await collect(inference, items)
    codes = {i: a.error.code for i, a in answers.items() if a.WhichOneof("response") == "error"}
    assert codes == {
        "empty": grpc.StatusCode.INVALID_ARGUMENT.value[0],
        "nothing": grpc.StatusCode.INVALID_ARGUMENT.value[0],
        "wrong-task": grpc.StatusCode.FAILED_PRECONDITION.value[0],
        "unknown": grpc.StatusCode.NOT_FOUND.value[0],
        "gen": grpc.StatusCode.FAILED_PRECONDITION.value[0],
    }
    assert "inputs[0] is empty" in answers["empty"].error.message
    assert "carries no request" in answers["nothing"].error.message
    assert answers["ok-1"].embed.dimensions == answers["ok-2"].embed.dimensions == 384


async def test_duplicate_in_flight_id_ends_the_stream(server: SidecarServer) -> None:
    async def requests() -> AsyncIterator[pb.StreamRequest]:
        yield embed("same", *(["a long-ish input to keep the first item busy"] * 32))
        yield embed("same", "second")

    with pytest.raises(InvalidInputError, match="'same' is already in flight on this stream"):
        async for _ in run_stream(server.dataplane, requests(), 4, None):
            pass


async def test_duplicate_id_over_grpc_is_invalid_argument(inference: InferenceStub) -> None:
    items = [embed("same", *(["keep me busy for a while"] * 32)), embed("same", "again")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(inference, items)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ids must be unique among in-flight items" in caught.value.details()


async def test_cancel_stops_an_in_flight_item(server: SidecarServer) -> None:
    release = asyncio.Event()

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        yield embed("slow", *(["cancel me before I finish, please"] * 32))
        yield pb.StreamRequest(id="slow", cancel=pb.CancelRequest())
        await release.wait()

    answers = []
    async for answer in run_stream(server.dataplane, requests(), 4, None):
        answers.append(answer)
        release.set()
    assert len(answers) == 1
    assert answers[0].error.code == grpc.StatusCode.CANCELLED.value[0]
    assert "cancelled" in answers[0].error.message


async def test_cancel_reaches_items_while_every_slot_is_busy(server: SidecarServer) -> None:
    release = asyncio.Event()
    busy = ["a text long enough to keep the model busy for a while " * 8] * 32

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        for item_id in ("a", "b", "c"):  # a and b take both slots; c waits in the backlog
            yield embed(item_id, *busy)
        yield pb.StreamRequest(id="c", cancel=pb.CancelRequest())
        yield pb.StreamRequest(id="a", cancel=pb.CancelRequest())
        await release.wait()

    answers = {}
    async for answer in run_stream(server.dataplane, requests(), 2, None):
        answers[answer.id] = answer
        if len(answers) == 3:
            release.set()
    cancelled = grpc.StatusCode.CANCELLED.value[0]
    assert answers["c"].error.code == cancelled
    assert answers["a"].error.code == cancelled
    assert answers["b"].embed.dimensions == 384


async def test_oversized_answer_fails_only_its_item(inference: InferenceStub) -> None:
    huge = "ab " * 100_000  # a 300 kB request whose token list is well over the 1 MiB limit
    items = [
        pb.StreamRequest(id="big", tokenize=pb.TokenizeRequest(inputs=[huge])),
        embed("after", "fine"),
    ]
    answers = await collect(inference, items)
    assert answers["big"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "over max_message_bytes 1048576" in answers["big"].error.message
    assert answers["after"].embed.dimensions == 384
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await inference.Tokenize(pb.TokenizeRequest(inputs=[huge]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send fewer or shorter inputs, or set truncate" in caught.value.details()


async def test_reading_stops_when_in_flight_bound_is_reached(server: SidecarServer) -> None:
    limit = 3
    pulled = 0
    answered = 0
    worst = 0

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        nonlocal pulled, worst
        for i in range(30):
            pulled += 1
            worst = max(worst, pulled - answered)
            yield embed(f"i{i}", *([f"text {i} " * 20] * 8))

    async for _ in run_stream(server.dataplane, requests(), limit, None):
        answered += 1
    assert answered == 30
    # At most `limit` items run or wait to be written, and at most `limit` more are read ahead.
    assert worst <= 2 * limit
    assert worst > limit  # the read-ahead is actually used under load


async def test_stream_over_grpc_with_half_close_mid_flight(inference: InferenceStub) -> None:
    call = inference.Stream()
    for i in range(5):
        await call.write(embed(f"h{i}", f"half-close test {i}"))
    await call.done_writing()
    ids = [response.id async for response in call]
    assert sorted(ids) == [f"h{i}" for i in range(5)]
    assert await call.code() == grpc.StatusCode.OK
