"""Bad input that any RPC can get: messages over max_message_bytes, bytes that do not
decode (invalid UTF-8), metadata over max_metadata_bytes, a 1 ms deadline."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.integration.bad_input import (
    BAD_UTF8,
    INVALID,
    collect,
    collect_generate,
    expect,
    generate,
    length_delimited,
    still_serving,
)

# ---------------------------------------------------------------- message size


async def test_message_over_the_size_limit(inference: InferenceStub) -> None:
    await expect(
        inference.Embed(pb.EmbedRequest(inputs=["x" * (2 * 1024 * 1024)])),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


async def test_message_over_max_message_bytes_is_refused_by_grpc(inference: InferenceStub) -> None:
    await expect(
        inference.Embed(pb.EmbedRequest(inputs=["x" * (1024 * 1024 + 1)])),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Received message larger than max",
        "vs. 1048576)",
    )
    # On Stream the oversized item ends the whole call: gRPC refuses it before it is read.
    items = [pb.StreamRequest(id="big", embed=pb.EmbedRequest(inputs=["x" * (2 << 20)]))]
    await expect(
        collect(inference.Stream(iter(items))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Received message larger than max",
    )
    await still_serving(inference)


# ---------------------------------------------------------------- invalid UTF-8


RAW_REQUESTS = {
    # EmbedRequest.inputs = 2, GenerateRequest.prompt = 2, GetModelRequest.model = 1.
    "/sidecar.v1.Inference/Embed": length_delimited(2, BAD_UTF8),
    "/sidecar.v1.Inference/Generate": length_delimited(2, BAD_UTF8),
    "/sidecar.v1.Models/GetModel": length_delimited(1, BAD_UTF8),
}


async def send_raw(channel: grpc.aio.Channel, method: str, raw: bytes) -> None:
    """Send bytes as they are (an identity serializer) to a unary or server-streaming RPC."""
    if method.endswith("/Generate"):
        async for _ in channel.unary_stream(method, lambda b: b, lambda b: b)(raw, timeout=10):
            pass
    else:
        await channel.unary_unary(method, lambda b: b, lambda b: b)(raw, timeout=10)


@pytest.mark.parametrize("method", list(RAW_REQUESTS))
async def test_invalid_utf8_on_a_unary_call_is_invalid_argument(
    channel: grpc.aio.Channel, inference: InferenceStub, method: str
) -> None:
    try:
        await expect(
            send_raw(channel, method, RAW_REQUESTS[method]), INVALID, "String field had bad UTF-8"
        )
    finally:
        await still_serving(inference)


async def test_invalid_utf8_on_a_stream_ends_it_with_invalid_argument(
    channel: grpc.aio.Channel, inference: InferenceStub
) -> None:
    good = pb.StreamRequest(id="good", tokenize=pb.TokenizeRequest(inputs=["x"]))
    # StreamRequest.id = 1, StreamRequest.embed = 2 holding EmbedRequest.inputs = 2.
    bad = length_delimited(1, b"bad") + length_delimited(2, length_delimited(2, BAD_UTF8))
    call = channel.stream_stream("/sidecar.v1.Inference/Stream", lambda b: b, lambda b: b)
    await expect(
        collect(call(iter([good.SerializeToString(), bad]), timeout=10)),  # type: ignore[arg-type]
        INVALID,
        "the request could not be parsed",
        "sidecar.v1.StreamRequest",
        "String field had bad UTF-8",
    )
    await still_serving(inference)


# ---------------------------------------------------------------- metadata


BIG_VALUE = [("x-ticket-note", "v" * 20_000)]


MANY_KEYS = [(f"x-key-{i}", "v") for i in range(500)]


async def test_metadata_under_the_bound_always_passes(inference: InferenceStub) -> None:
    """12 KB of metadata: gRPC's default soft limit refused it at random, 6 to 13 times of 20."""
    for _ in range(20):
        answer = await inference.Tokenize(
            pb.TokenizeRequest(inputs=["x"]), metadata=[("x-note", "v" * 12_000)], timeout=10
        )
        assert answer.results


@pytest.mark.parametrize("metadata", [BIG_VALUE, MANY_KEYS], ids=["one-large-value", "500-keys"])
async def test_metadata_over_the_bound_is_refused_with_the_limit_named(
    inference: InferenceStub, metadata: list[tuple[str, str]]
) -> None:
    for _ in range(5):
        await expect(
            inference.Tokenize(pb.TokenizeRequest(inputs=["x"]), metadata=metadata, timeout=10),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "over this server's limit of 16384 (max_metadata_bytes)",
            "the same call will always be refused",
        )
    stream = inference.Stream(
        iter([pb.StreamRequest(id="a", tokenize=pb.TokenizeRequest(inputs=["x"]))]),
        metadata=metadata,
        timeout=10,
    )
    await expect(collect(stream), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_metadata_bytes")
    await still_serving(inference)


async def test_metadata_past_grpcs_own_bound_is_refused_every_time(
    inference: InferenceStub,
) -> None:
    """Past 4 x max_metadata_bytes gRPC core refuses before the server sees the call."""
    for _ in range(5):
        await expect(
            inference.Tokenize(
                pb.TokenizeRequest(inputs=["x"]), metadata=[("x-note", "v" * 70_000)], timeout=10
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "exceeds hard limit",
        )
    await still_serving(inference)


# ---------------------------------------------------------------- deadlines


def client_write_race(error: grpc.aio.AioRpcError) -> bool:
    """grpc.aio's own failure when it writes a request after the call's deadline passed.

    The request iterator's write can lose the race with the deadline; the client
    library then ends the call itself with INTERNAL "Internal error from Core" and
    an `execute_batch` debug string (grpc/grpc#36066), before the server answers.
    """
    return (
        error.code() == grpc.StatusCode.INTERNAL
        and error.details() == "Internal error from Core"
        and "execute_batch" in (error.debug_error_string() or "")
    )


async def expect_stream_deadline(stub: InferenceStub, tries: int = 10) -> None:
    """A Stream with a 1 ms deadline ends DEADLINE_EXCEEDED, or, when the server's answer
    beats the client's own timer, its item does; the client's write race is retried."""
    for _ in range(tries):
        ended: grpc.aio.AioRpcError | None = None
        try:
            answers = await collect(
                stub.Stream(
                    iter([pb.StreamRequest(id="d", embed=pb.EmbedRequest(inputs=["x"] * 32))]),
                    timeout=0.001,
                )
            )
        except grpc.aio.AioRpcError as error:
            ended = error
        if ended is None:
            (answer,) = answers["d"]
            assert answer.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], answer
            return
        if not client_write_race(ended):
            assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ended.details()
            return
    pytest.fail(f"the client lost its write race with the deadline {tries} times in a row")


async def test_one_millisecond_deadline(inference: InferenceStub, tasks: InferenceStub) -> None:
    calls: list[Awaitable[Any]] = [
        inference.Tokenize(pb.TokenizeRequest(inputs=["x"] * 32), timeout=0.001),
        inference.Classify(pb.ClassifyRequest(model="triage", inputs=["x"] * 32), timeout=0.001),
        tasks.Rerank(pb.RerankRequest(model="ranker", query="q", inputs=["p"] * 8), timeout=0.001),
        collect_generate(
            tasks.Generate(
                pb.GenerateRequest(model="gpt2", prompt="x", max_new_tokens=100), timeout=0.001
            )
        ),
    ]
    for call in calls:
        await expect(call, grpc.StatusCode.DEADLINE_EXCEEDED)
    await expect_stream_deadline(inference)
    await still_serving(inference)
    await still_serving(tasks)
    steps = await generate(tasks, pb.GenerateRequest(model="gpt2", prompt="x", max_new_tokens=2))
    assert steps[-1].usage.completion_tokens == 2
