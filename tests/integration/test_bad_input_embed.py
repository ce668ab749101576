"""Bad input to Embed and Tokenize on the session server: no inputs, blank ones, a megabyte
of text, more inputs than max_client_batch_size, deadlines. Each is refused with its status
code and a message that says how to fix it, and the server goes on serving."""

from __future__ import annotations

import re

import grpc
import pytest

from sidecar.server import SidecarServer
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.integration.bad_input import INVALID, ONE_MB, expect, still_serving


async def test_no_inputs(inference: InferenceStub) -> None:
    await expect(
        inference.Embed(pb.EmbedRequest()), grpc.StatusCode.INVALID_ARGUMENT, "inputs is empty"
    )


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


async def test_more_inputs_than_the_limit(inference: InferenceStub) -> None:
    await expect(
        inference.Embed(pb.EmbedRequest(inputs=["x"] * 33)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "33 inputs, over max_client_batch_size 32",
        "split the call",
    )


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


async def test_deadline_passed(inference: InferenceStub) -> None:
    await expect(
        inference.Embed(
            pb.EmbedRequest(inputs=["a deadline too short to meet"] * 32), timeout=0.001
        ),
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    # The server keeps serving afterwards.
    response = await inference.Embed(pb.EmbedRequest(inputs=["still here"]))
    assert response.dimensions == 384


async def test_dataplane_deadline_message(server: SidecarServer) -> None:
    import time

    from sidecar.domain import EmbedRequest
    from sidecar.errors import DeadlineExceededError

    with pytest.raises(
        DeadlineExceededError, match="deadline passed while queued, before the model ran"
    ):
        await server.dataplane.run(
            EmbedRequest(model="", inputs=["x"]), deadline=time.monotonic() - 1
        )
