"""Every client mistake gets its status code and a message that says how to fix it."""

from __future__ import annotations

import grpc
import pytest

from sidecar.grpc.server import SidecarServer
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import models_pb2
from sidecar.v1.inference_pb2_grpc import InferenceStub
from sidecar.v1.models_pb2_grpc import ModelsStub


async def expect(call: object, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    for fragment in fragments:
        assert fragment in caught.value.details()


async def test_no_inputs(inference: InferenceStub) -> None:
    await expect(
        inference.Embed(pb.EmbedRequest()), grpc.StatusCode.INVALID_ARGUMENT, "inputs is empty"
    )


@pytest.mark.parametrize("blank", ["", "   ", "\n\t "])
async def test_empty_or_whitespace_input(inference: InferenceStub, blank: str) -> None:
    await expect(
        inference.Classify(pb.ClassifyRequest(model="triage", inputs=["fine", blank])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[1] is empty or whitespace-only",
    )


async def test_more_inputs_than_the_limit(inference: InferenceStub) -> None:
    await expect(
        inference.Embed(pb.EmbedRequest(inputs=["x"] * 33)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "33 inputs, over max_client_batch_size 32",
        "split the call",
    )


async def test_unknown_model_lists_the_served_ones(
    inference: InferenceStub, models: ModelsStub
) -> None:
    await expect(
        inference.Embed(pb.EmbedRequest(model="gpt-17", inputs=["x"])),
        grpc.StatusCode.NOT_FOUND,
        "no model named 'gpt-17'",
        "'minilm', 'triage', 'moderation'",
    )
    await expect(
        models.GetModel(models_pb2.GetModelRequest(model="gpt-17")), grpc.StatusCode.NOT_FOUND
    )


async def test_task_the_model_does_not_do(inference: InferenceStub) -> None:
    await expect(
        inference.Classify(pb.ClassifyRequest(model="minilm", inputs=["x"])),
        grpc.StatusCode.FAILED_PRECONDITION,
        "model 'minilm' does feature-extraction, but Classify needs a text-classification or "
        "zero-shot-classification model",
        "models that do: triage, moderation",
    )
    await expect(
        inference.Embed(pb.EmbedRequest(model="triage", inputs=["x"])),
        grpc.StatusCode.FAILED_PRECONDITION,
        "Embed needs a feature-extraction model",
    )


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
        await server.dataplane.embed(
            EmbedRequest(model="", inputs=["x"]), deadline=time.monotonic() - 1
        )


async def test_message_over_the_size_limit(inference: InferenceStub) -> None:
    await expect(
        inference.Embed(pb.EmbedRequest(inputs=["x" * (2 * 1024 * 1024)])),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


@pytest.mark.parametrize(
    ("rpc", "request_"),
    [
        ("ExtractEntities", pb.ExtractEntitiesRequest(inputs=["x"])),
        ("Rerank", pb.RerankRequest(query="q", inputs=["x"])),
    ],
)
async def test_task_rpcs_on_an_embedding_model_are_a_wrong_task(
    inference: InferenceStub, rpc: str, request_: object
) -> None:
    await expect(
        getattr(inference, rpc)(request_),
        grpc.StatusCode.FAILED_PRECONDITION,
        f"but {rpc} needs a",
        "no served model does",
    )


async def test_generate_on_an_embedding_model_is_a_wrong_task(inference: InferenceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in inference.Generate(pb.GenerateRequest(prompt="hi")):
            pass
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs a text-generation or text2text-generation model" in caught.value.details()
