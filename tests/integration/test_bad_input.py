"""Bad input of every kind: each gets its status code and a message that says what was wrong
and how to fix it, and the server goes on serving (a good call right after succeeds).

The session server (minilm, triage, moderation; 32 inputs per call, 1 MiB messages, 4 Stream
items in flight) takes the encoder cases; a module server with a generator, a token
classifier and a reranker takes the others. A last test runs `sidecar serve` and checks that
thousands of bad requests leave its memory where it was.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import pytest

from sidecar.config import ModelSettings, Settings
from sidecar.errors import SidecarError
from sidecar.grpc.server import SidecarServer
from sidecar.grpc.stream import _StreamCall
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc, models_pb2
from sidecar.v1.inference_pb2_grpc import InferenceStub
from sidecar.v1.models_pb2_grpc import ModelsStub
from tests.processes import free_port, start_sidecar, stop_sidecar, wait_serving

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ONE_MB = "refund " * (1_000_000 // 7)  # 1 MB of text: about 140,000 words


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


@pytest.fixture(scope="module")
async def tasks(
    gpt2_dir: Path, token_classifier_dir: Path, cross_encoder_dir: Path
) -> AsyncIterator[InferenceStub]:
    """A generator (128-token context), a token classifier and a reranker (8 passages)."""
    settings = Settings(
        address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
        models=(
            ModelSettings(path=gpt2_dir, name="gpt2"),
            ModelSettings(path=token_classifier_dir, name="ner"),
            ModelSettings(path=cross_encoder_dir, name="ranker"),
        ),
        max_client_batch_size=32,
        max_message_bytes=1024 * 1024,
        max_rerank_passages=8,
        stream_max_in_flight=4,
        grace_period_s=1.0,
        intra_op_threads=1,
    )
    server = await SidecarServer.start(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield InferenceStub(channel)
    await server.stop(grace=0)


# ---------------------------------------------------------------- empty, long, too many


@pytest.mark.parametrize("blank", ["", " ", "\t\n\r", "\u3000\u00a0\u2003"])
@pytest.mark.parametrize("rpc", ["Embed", "Classify", "Tokenize"])
async def test_empty_and_whitespace_only_inputs(
    inference: InferenceStub, rpc: str, blank: str
) -> None:
    request = {
        "Embed": pb.EmbedRequest(inputs=["fine", blank]),
        "Classify": pb.ClassifyRequest(model="triage", inputs=["fine", blank]),
        "Tokenize": pb.TokenizeRequest(inputs=["fine", blank]),
    }[rpc]
    await expect(
        getattr(inference, rpc)(request),
        INVALID,
        "inputs[1] is empty or whitespace-only",
        "send text with at least one visible character",
    )
    await still_serving(inference)


async def test_empty_query_passage_prompt_and_candidate_label(
    tasks: InferenceStub, inference: InferenceStub
) -> None:
    await expect(
        tasks.Rerank(pb.RerankRequest(model="ranker", query=" \n", inputs=["p"])),
        INVALID,
        "query is empty or whitespace-only: send the search query",
    )
    await expect(
        tasks.Rerank(pb.RerankRequest(model="ranker", query="q", inputs=["p", "\t"])),
        INVALID,
        "inputs[1] is empty or whitespace-only",
    )
    await expect(
        tasks.ExtractEntities(pb.ExtractEntitiesRequest(model="ner", inputs=[" "])),
        INVALID,
        "inputs[0] is empty or whitespace-only",
    )
    await expect(
        generate(tasks, pb.GenerateRequest(model="gpt2", prompt="")),
        INVALID,
        "no prompt",
    )
    await still_serving(tasks)


async def test_one_megabyte_input_is_truncated_by_default(inference: InferenceStub) -> None:
    answer = await inference.Embed(pb.EmbedRequest(inputs=[ONE_MB]), timeout=30)
    assert (answer.embeddings[0].truncated, answer.embeddings[0].token_count) == (True, 256)
    classified = await inference.Classify(
        pb.ClassifyRequest(model="triage", inputs=[ONE_MB]), timeout=30
    )
    assert classified.results[0].truncated
    await still_serving(inference)


async def test_one_megabyte_input_without_truncation_names_its_length_and_the_limit(
    inference: InferenceStub,
) -> None:
    details = await expect(
        inference.Embed(pb.EmbedRequest(inputs=["short", ONE_MB], truncate=False), timeout=30),
        INVALID,
        "inputs[1] is ",
        "over the model's limit of 256",
        "set truncate=true to cut it",
    )
    tokens = int(re.search(r"inputs\[1\] is (\d+) tokens", details).group(1))  # type: ignore[union-attr]
    assert tokens > 100_000
    await still_serving(inference)


async def test_one_megabyte_prompt_is_cut_or_refused(tasks: InferenceStub) -> None:
    steps = await generate(tasks, pb.GenerateRequest(model="gpt2", prompt=ONE_MB, max_new_tokens=2))
    assert steps[-1].usage.truncated_prompt_tokens > 100_000
    await expect(
        generate(
            tasks, pb.GenerateRequest(model="gpt2", prompt=ONE_MB, max_new_tokens=2, truncate=False)
        ),
        INVALID,
        "over the 126 tokens the model's context of 128 leaves beside max_new_tokens 2",
        "set truncate to cut it",
    )
    await still_serving(tasks)


async def test_more_inputs_than_max_client_batch_size(inference: InferenceStub) -> None:
    fix = "split the call into calls of at most 32, or send them as Stream items"
    await expect(
        inference.Tokenize(pb.TokenizeRequest(inputs=["x"] * 33)),
        INVALID,
        "33 inputs, over max_client_batch_size 32",
        fix,
    )
    answers = [
        a
        async for a in inference.Stream(
            iter([pb.StreamRequest(id="many", embed=pb.EmbedRequest(inputs=["x"] * 1000))])
        )
    ]
    assert answers[0].error.code == INVALID.value[0]
    assert "1000 inputs, over max_client_batch_size 32" in answers[0].error.message
    await still_serving(inference)


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


async def collect(call: AsyncIterator[pb.StreamResponse]) -> dict[str, list[pb.StreamResponse]]:
    answers: dict[str, list[pb.StreamResponse]] = {}
    async for answer in call:
        answers.setdefault(answer.id, []).append(answer)
    return answers


# ---------------------------------------------------------------- invalid UTF-8


def length_delimited(field: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2 (string, bytes, message), written by hand."""
    assert len(payload) < 128
    return bytes([field << 3 | 2, len(payload)]) + payload


BAD_UTF8 = b"caf\xe9"  # Latin-1 "café": protobuf's Python refuses to build such a string
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


# ---------------------------------------------------------------- enums and numbers


@pytest.mark.parametrize("value", [6, 42, -1, 2**31 - 1])
async def test_unknown_enum_value_is_refused_naming_the_field(
    tasks: InferenceStub, value: int
) -> None:
    request = pb.ExtractEntitiesRequest(model="ner", inputs=["x"], aggregation=value)  # type: ignore[arg-type]
    await expect(
        tasks.ExtractEntities(request),
        INVALID,
        f"aggregation {value} is not an AggregationStrategy value",
        "AGGREGATION_STRATEGY_MAX (5)",
        "leave it unset for SIMPLE",
    )
    answers = await collect(
        tasks.Stream(iter([pb.StreamRequest(id="e", extract_entities=request)]))
    )
    assert answers["e"][0].error.code == INVALID.value[0]
    assert "is not an AggregationStrategy value" in answers["e"][0].error.message
    await still_serving(tasks)


INT32_MAX, INT32_MIN, UINT64_MAX = 2**31 - 1, -(2**31), 2**64 - 1
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be 0 (the default) or more, got -1"),
        (
            {"max_new_tokens": INT32_MIN},
            f"max_new_tokens must be 0 (the default) or more, got {INT32_MIN}",
        ),
        (
            {"max_new_tokens": INT32_MAX, "truncate": False},
            f"max_new_tokens {INT32_MAX} leaves no room",
        ),
        ({"temperature": -0.5}, "temperature must be 0 (greedy) or more, got -0.5"),
        ({"temperature": NAN}, "temperature must be a finite number, got nan"),
        ({"temperature": INF}, "temperature must be a finite number, got inf"),
        ({"top_k": -1}, "top_k must be 0 (no limit) or more, got -1"),
        ({"top_k": INT32_MIN}, "top_k must be 0 (no limit) or more"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": -1.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": NAN}, "top_p must be a finite number, got nan"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be above 0 (1 = off), got 0.0"),
        ({"repetition_penalty": -2.0}, "repetition_penalty must be above 0"),
        ({"repetition_penalty": -INF}, "repetition_penalty must be a finite number, got -inf"),
        ({"stop": ["x"] * 17}, "17 stop sequences; at most 16 are allowed"),
        ({"stop": ["x" * 257]}, "stop[0] must be 1 to 256 characters, got 257"),
        ({"stop": [""]}, "stop[0] must be 1 to 256 characters, got 0"),
    ],
)
async def test_out_of_range_generation_parameters(
    tasks: InferenceStub, fields: dict[str, Any], fragment: str
) -> None:
    await expect(
        generate(tasks, pb.GenerateRequest(model="gpt2", prompt="hello", **fields)),
        INVALID,
        fragment,
    )
    await still_serving(tasks)


@pytest.mark.parametrize(
    "fields",
    [
        {"max_new_tokens": 0},  # the model's default
        {"max_new_tokens": INT32_MAX},  # ends when the context is full
        {"temperature": 0.0},
        {"temperature": -0.0},
        {"temperature": 3.4e38},
        {"temperature": 1e-45},
        {"top_k": 0},
        {"top_k": INT32_MAX, "temperature": 1.0},
        {"top_p": 1e-45, "temperature": 1.0},
        {"top_p": 1.0, "temperature": 1.0},
        {"repetition_penalty": 3.4e38},
        {"repetition_penalty": 1e-45, "temperature": 1.0},
        {"seed": 0, "temperature": 1.0},
        {"seed": UINT64_MAX, "temperature": 1.0},
    ],
)
async def test_extreme_but_valid_generation_parameters_generate(
    tasks: InferenceStub, fields: dict[str, Any]
) -> None:
    fields = {"max_new_tokens": 3, **fields}
    steps = await generate(tasks, pb.GenerateRequest(model="gpt2", prompt="hello", **fields))
    last = steps[-1]
    assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert last.usage.prompt_tokens + last.usage.completion_tokens <= 128


async def test_count_parameters(inference: InferenceStub, tasks: InferenceStub) -> None:
    for top_k in (-1, INT32_MIN):
        await expect(
            inference.Classify(pb.ClassifyRequest(model="triage", inputs=["x"], top_k=top_k)),
            INVALID,
            f"top_k must be 0 (no limit) or positive, got {top_k}",
        )
    everything = await inference.Classify(pb.ClassifyRequest(model="triage", inputs=["x"]))
    for top_k in (1, INT32_MAX):
        answer = await inference.Classify(
            pb.ClassifyRequest(model="triage", inputs=["x"], top_k=top_k)
        )
        assert len(answer.results[0].labels) == min(top_k, len(everything.results[0].labels))
    for top_n in (-1, INT32_MIN):
        await expect(
            tasks.Rerank(pb.RerankRequest(model="ranker", query="q", inputs=["p"], top_n=top_n)),
            INVALID,
            f"top_n must be 0 (no limit) or positive, got {top_n}",
        )
    ranked = await tasks.Rerank(
        pb.RerankRequest(model="ranker", query="q", inputs=["a", "b"], top_n=INT32_MAX)
    )
    assert len(ranked.results) == 2
    await expect(
        tasks.Rerank(pb.RerankRequest(model="ranker", query="q")), INVALID, "inputs is empty"
    )
    await expect(
        tasks.Rerank(pb.RerankRequest(model="ranker", query="q", inputs=["p"] * 5000)),
        INVALID,
        "5000 inputs, over max_rerank_passages 8",
    )
    await still_serving(tasks)


# ---------------------------------------------------------------- models and tasks


@pytest.mark.parametrize(
    ("rpc", "request_"),
    [
        ("Embed", pb.EmbedRequest(model="nope", inputs=["x"])),
        ("Classify", pb.ClassifyRequest(model="nope", inputs=["x"])),
        ("Tokenize", pb.TokenizeRequest(model="nope", inputs=["x"])),
        ("ExtractEntities", pb.ExtractEntitiesRequest(model="nope", inputs=["x"])),
        ("Rerank", pb.RerankRequest(model="nope", query="q", inputs=["x"])),
        ("Generate", pb.GenerateRequest(model="nope", prompt="x")),
    ],
)
async def test_unknown_model_lists_the_served_ones(
    inference: InferenceStub, rpc: str, request_: Any
) -> None:
    call = getattr(inference, rpc)(request_)
    await expect(
        collect_generate(call) if rpc == "Generate" else call,
        grpc.StatusCode.NOT_FOUND,
        "no model named 'nope'; this sidecar serves 'minilm', 'triage', 'moderation'",
        "leave model empty for the default",
    )
    await still_serving(inference)


async def collect_generate(call: AsyncIterator[pb.GenerateResponse]) -> None:
    async for _ in call:
        pass


async def test_unknown_model_on_models_and_stream(
    channel: grpc.aio.Channel, inference: InferenceStub
) -> None:
    await expect(
        ModelsStub(channel).GetModel(models_pb2.GetModelRequest(model="nope")),
        grpc.StatusCode.NOT_FOUND,
        "'minilm', 'triage', 'moderation'",
    )
    item = pb.StreamRequest(id="u", embed=pb.EmbedRequest(model="nope", inputs=["x"]))
    answers = await collect(inference.Stream(iter([item])))
    assert answers["u"][0].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no model named 'nope'" in answers["u"][0].error.message


async def test_wrong_task_names_the_models_that_do_it(tasks: InferenceStub) -> None:
    await expect(
        tasks.Embed(pb.EmbedRequest(model="gpt2", inputs=["x"])),
        grpc.StatusCode.FAILED_PRECONDITION,
        "model 'gpt2' does text-generation, but Embed needs a feature-extraction model",
        "no served model does",
    )
    await expect(
        tasks.Rerank(pb.RerankRequest(model="ner", query="q", inputs=["x"])),
        grpc.StatusCode.FAILED_PRECONDITION,
        "but Rerank needs a text-ranking model; models that do: ranker",
    )
    await expect(
        collect_generate(tasks.Generate(pb.GenerateRequest(model="ranker", prompt="x"))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "models that do: gpt2",
    )
    await still_serving(tasks)


# ---------------------------------------------------------------- Stream


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
    stream = _StreamCall(server.dataplane, flood(), limit, None, 1 << 20)
    answers = stream.answers()
    await anext(answers)  # then read nothing more, as a stuck client
    await asyncio.sleep(1.0)
    try:
        assert pulled <= 4 * limit, f"{pulled} items read while none of the answers was"
        assert stream.out.qsize() <= 2 * limit
    finally:
        await answers.aclose()


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


# ---------------------------------------------------------------- memory under bad input


async def test_a_refused_call_leaves_nothing_for_the_garbage_collector(
    inference: InferenceStub,
) -> None:
    """A refused call's exception, frames and request are freed when it ends, not when the
    cyclic garbage collector next runs (context.abort() kept them in a reference cycle: a
    refused 1 MB input held its 140,000-token encodings until then)."""

    def suspects() -> dict[int, str]:
        found = {}
        for o in gc.get_objects():
            kind = type(o)  # not isinstance(): it reads __class__, which warns on some objects
            if issubclass(kind, SidecarError):
                found[id(o)] = f"{kind.__name__}: {o}"[:80]
            elif kind is FrameType and o.f_code.co_name in ("_encode", "wrapper"):
                found[id(o)] = f"frame {o.f_code.co_name}"
        return found

    gc.collect()
    gc.disable()
    try:
        earlier = suspects()  # alive for reasons of their own (an earlier test's, say)
        for _ in range(3):
            await expect(
                inference.Embed(pb.EmbedRequest(inputs=[ONE_MB], truncate=False), timeout=30),
                INVALID,
            )
            await expect(inference.Embed(pb.EmbedRequest(model="nope", inputs=["x"])), NOT_FOUND)
        # The tokenizing thread lets go of its work item (and the last exception) a moment
        # after the answer is out.
        await asyncio.sleep(0.5)
        left = [what for key, what in suspects().items() if key not in earlier]
    finally:
        gc.enable()
    assert not left, f"kept alive by reference cycles: {left}"


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def bad_requests(
    channel: grpc.Channel, stub: inference_pb2_grpc.InferenceStub
) -> Iterator[grpc.StatusCode]:
    """Bad requests of every kind, round and round; yields each one's status code (OK for a
    Stream whose items were refused one by one). The costly kinds (a whole 70 kB text
    tokenized, a message gRPC refuses) come every eighth round."""
    long_text = "refund " * 10_000  # 70 kB: 10,000 tokens, under the 128 KiB message limit
    raw_embed = channel.unary_unary("/sidecar.v1.Inference/Embed", lambda b: b, lambda b: b)
    raw_stream = channel.stream_stream("/sidecar.v1.Inference/Stream", lambda b: b, lambda b: b)
    bad_item = length_delimited(1, b"bad") + length_delimited(2, length_delimited(2, BAD_UTF8))

    def stream(items: list[pb.StreamRequest]) -> Any:
        return list(stub.Stream(iter(items), timeout=10))

    def gen(**fields: Any) -> Any:
        return list(stub.Generate(pb.GenerateRequest(model="gpt2", **fields), timeout=10))

    cheap = [
        lambda: stub.Embed(pb.EmbedRequest(inputs=[""]), timeout=10),
        lambda: stub.Embed(pb.EmbedRequest(inputs=[" \t"]), timeout=10),
        lambda: stub.Tokenize(pb.TokenizeRequest(inputs=["x"] * 9), timeout=10),
        lambda: raw_embed(length_delimited(2, BAD_UTF8), timeout=10),
        lambda: list(raw_stream(iter([bad_item]), timeout=10)),
        lambda: stub.ExtractEntities(
            pb.ExtractEntitiesRequest(inputs=["x"], aggregation=9),  # type: ignore[arg-type]
            timeout=10,
        ),
        lambda: gen(prompt="x", temperature=float("nan")),
        lambda: gen(prompt="x", top_p=2.0),
        lambda: gen(prompt="", max_new_tokens=-1),
        lambda: gen(prompt="x", max_new_tokens=2**31 - 1, truncate=False),
        lambda: stub.Embed(pb.EmbedRequest(model="nope", inputs=["x"]), timeout=10),
        lambda: stub.Classify(pb.ClassifyRequest(model="minilm", inputs=["x"]), timeout=10),
        lambda: stub.Classify(
            pb.ClassifyRequest(model="triage", inputs=["x"], top_k=-1), timeout=10
        ),
        lambda: stream(
            [
                pb.StreamRequest(id="a", embed=pb.EmbedRequest(inputs=["x"] * 8)),
                pb.StreamRequest(id="a", embed=pb.EmbedRequest(inputs=["x"])),
            ]
        ),
        lambda: stream(
            [pb.StreamRequest(id=f"n{i}") for i in range(20)]
            + [pb.StreamRequest(id="c", cancel=pb.CancelRequest())]
        ),
        lambda: stub.Embed(pb.EmbedRequest(inputs=["x"] * 8), timeout=0.001),
    ]
    costly = [
        lambda: stub.Embed(pb.EmbedRequest(inputs=[long_text], truncate=False), timeout=10),
        lambda: gen(prompt=long_text, truncate=False),
        lambda: stub.Embed(pb.EmbedRequest(inputs=["x" * 140_000]), timeout=10),
    ]
    for round_ in itertools.count():
        for kind in cheap + (costly if round_ % 8 == 0 else []):
            try:
                kind()
            except grpc.RpcError as err:
                yield err.code()  # type: ignore[attr-defined]
            else:
                yield grpc.StatusCode.OK


@pytest.mark.slow
def test_thousands_of_bad_requests_leave_memory_flat(
    minilm_dir: Path, classifier_dir: Path, gpt2_dir: Path, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    process = start_sidecar(
        tmp_path / "serve.log",
        *("--model", f"minilm={minilm_dir}", "--model", f"triage={classifier_dir}"),
        *("--model", f"gpt2={gpt2_dir}", "--address", address, "--metrics-address", ""),
        *("--max-client-batch-size", "8", "--max-message-bytes", str(128 * 1024)),
        *("--intra-op-threads", "1", "--log-level", "ERROR"),
        env={**os.environ, "SIDECAR_GRACE_PERIOD_S": "1"},
    )
    try:
        wait_serving(address, process)
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            codes = bad_requests(channel, stub)
            began = time.monotonic()
            warm_up, rest = 500, 3000
            seen = [next(codes) for _ in range(warm_up)]
            before = vm_rss_kib(process.pid)
            middle = 0
            for i in range(rest):
                seen.append(next(codes))
                if i == rest // 2:
                    middle = vm_rss_kib(process.pid)
            after = vm_rss_kib(process.pid)
            elapsed = time.monotonic() - began
            ok = stub.Embed(pb.EmbedRequest(inputs=["still serving"]), timeout=10)
        assert ok.dimensions == 384
        assert process.poll() is None
        counts = {code.name: seen.count(code) for code in set(seen)}
        print(
            f"\n{len(seen)} bad requests in {elapsed:.1f}s {counts}; VmRSS after {warm_up}: "
            f"{before / 1024:.1f} MiB, after {warm_up + rest // 2}: {middle / 1024:.1f} MiB, "
            f"after {len(seen)}: {after / 1024:.1f} MiB (+{(after - before) / 1024:.1f} MiB)"
        )
        expected = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"}
        expected |= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
        assert set(counts) <= expected, counts
        assert after - before < 30 * 1024, f"VmRSS grew {(after - before) / 1024:.1f} MiB"
    finally:
        stop_sidecar(process)
