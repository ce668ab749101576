"""What the test_bad_input_* modules share: bad input of every kind gets its status code and
a message that says what was wrong and how to fix it, and the server goes on serving (a good
call right after succeeds).

The session server (minilm, triage, moderation; 32 inputs per call, 1 MiB messages, 4 Stream
items in flight) takes the encoder cases; the `tasks` server (a generator, a token classifier
and a reranker, one per module) takes the others.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ONE_MB = "refund " * (1_000_000 // 7)  # 1 MB of text: about 140,000 words
INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)
BAD_UTF8 = b"caf\xe9"  # Latin-1 "café": protobuf's Python refuses to build such a string


async def expect(call: Awaitable[Any], code: grpc.StatusCode, *fragments: str) -> str:
    """The call fails with `code` and a message holding every fragment; returns the message."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = caught.value.details() or ""
    assert caught.value.code() == code, details
    for fragment in fragments:
        assert fragment in details, details
    return details


async def generate(stub: InferenceStub, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return [step async for step in stub.Generate(request, timeout=30)]


async def still_serving(stub: InferenceStub) -> None:
    """A good call right after the bad one succeeds."""
    answer = await stub.Tokenize(pb.TokenizeRequest(inputs=["still serving"]), timeout=10)
    assert answer.results[0].token_count > 0


async def collect(call: AsyncIterator[pb.StreamResponse]) -> dict[str, list[pb.StreamResponse]]:
    answers: dict[str, list[pb.StreamResponse]] = {}
    async for answer in call:
        answers.setdefault(answer.id, []).append(answer)
    return answers


async def collect_generate(call: AsyncIterator[pb.GenerateResponse]) -> None:
    async for _ in call:
        pass


def length_delimited(field: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2 (string, bytes, message), written by hand."""
    assert len(payload) < 128
    return bytes([field << 3 | 2, len(payload)]) + payload
