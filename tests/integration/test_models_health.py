"""Models service, grpc.health.v1 per model and overall, and server reflection."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from sidecar.config import Settings
from sidecar.server import SidecarServer
from sidecar.v1 import common_pb2, inference_pb2, models_pb2
from sidecar.v1.inference_pb2_grpc import InferenceStub
from sidecar.v1.models_pb2_grpc import ModelsStub
from tests.checkpoints import LABELS
from tests.conftest import channel_to, serving


async def test_list_models(models: ModelsStub) -> None:
    response = await models.ListModels(models_pb2.ListModelsRequest())
    assert response.default_model == "minilm"
    by_name = {m.name: m for m in response.models}
    assert list(by_name) == ["minilm", "triage", "moderation"]
    minilm = by_name["minilm"]
    assert minilm.task == common_pb2.TASK_EMBED
    assert minilm.state == models_pb2.MODEL_STATE_SERVING
    assert (minilm.dimensions, minilm.max_length, minilm.pooling, minilm.normalize) == (
        384,
        256,
        "mean",
        True,
    )
    assert minilm.revision.startswith("sha256:")
    assert 0 < minilm.validation_max_abs_diff <= minilm.validation_atol
    assert minilm.exported_by["optimum-onnx"] == "0.1.0"
    triage = by_name["triage"]
    assert triage.task == common_pb2.TASK_CLASSIFY
    assert list(triage.labels) == list(LABELS.values())


async def test_get_model_default_and_by_name(models: ModelsStub) -> None:
    default = await models.GetModel(models_pb2.GetModelRequest())
    assert default.model.name == "minilm"
    triage = await models.GetModel(models_pb2.GetModelRequest(model="triage"))
    assert triage.model.backend == "onnx"
    assert triage.model.device == "cpu"


async def test_health_overall_services_and_models(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "sidecar.v1.Inference", "sidecar.v1.Models", "sidecar.v1.Inference/triage"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_reflection_lists_and_describes_everything(server: SidecarServer) -> None:
    # A blocking client in a thread (the server runs on this test's event loop).
    await asyncio.to_thread(describe_everything, server.port)


def describe_everything(port: int) -> None:
    """What grpcurl does: list services, then resolve every method's types by reflection."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"sidecar.v1.Inference", "sidecar.v1.Models", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(database)
        inference = pool.FindServiceByName("sidecar.v1.Inference")
        assert [m.name for m in inference.methods] == [
            "Embed",
            "Classify",
            "ExtractEntities",
            "Rerank",
            "Tokenize",
            "Generate",
            "Stream",
        ]
        stream = inference.methods_by_name["Stream"]
        assert stream.input_type.full_name == "sidecar.v1.StreamRequest"
        error = stream.output_type.fields_by_name["error"]
        assert error.message_type.full_name == "google.rpc.Status"
        models = pool.FindServiceByName("sidecar.v1.Models")
        assert {m.name for m in models.methods} == {"ListModels", "GetModel"}


async def test_connections_are_recycled_after_max_connection_age(settings: Settings) -> None:
    """A client is moved to a new connection after the age, its calls unaffected."""

    async def connection_after_a_call(age: float) -> grpc.ChannelConnectivity:
        aged = dataclasses.replace(settings, max_connection_age_s=age, metrics_address="")
        async with serving(aged) as server, channel_to(server) as channel:
            embed = InferenceStub(channel).Embed
            await embed(inference_pb2.EmbedRequest(inputs=["first"]))
            await asyncio.sleep(1.5)  # core jitters the age by up to 10%
            state = channel.get_state()
            answer = await embed(inference_pb2.EmbedRequest(inputs=["after"]))
            assert answer.dimensions == 384
            return state

    assert await connection_after_a_call(0.3) == grpc.ChannelConnectivity.IDLE
    assert await connection_after_a_call(0) == grpc.ChannelConnectivity.READY
