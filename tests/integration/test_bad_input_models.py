"""Calls that name the wrong model: one this sidecar does not serve (on every RPC, GetModel
and Stream items included), or one that does not do the task; the message lists the models
that would do."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import models_pb2
from sidecar.v1.inference_pb2_grpc import InferenceStub
from sidecar.v1.models_pb2_grpc import ModelsStub
from tests.integration.bad_input import collect, collect_generate, expect, still_serving


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
