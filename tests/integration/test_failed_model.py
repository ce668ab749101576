"""A damaged model dir is refused at load; the other models keep serving."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.config import ModelSettings, Settings
from sidecar.server import SidecarServer
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc, models_pb2, models_pb2_grpc
from tests.conftest import channel_to, serving


@pytest.fixture(scope="module")
async def damaged_server(
    classifier_dir: Path, multilabel_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SidecarServer]:
    broken = tmp_path_factory.mktemp("broken") / "broken"
    shutil.copytree(classifier_dir, broken)
    model = broken / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    settings = Settings(
        address="127.0.0.1:0",
        http_address="",
        metrics_address="127.0.0.1:0",
        models=(ModelSettings(path=broken, name="broken"), ModelSettings(path=multilabel_dir)),
    )
    async with serving(settings) as server:
        yield server


async def test_damaged_model_is_failed_and_others_serve(damaged_server: SidecarServer) -> None:
    async with channel_to(damaged_server) as channel:
        listing = await models_pb2_grpc.ModelsStub(channel).ListModels(
            models_pb2.ListModelsRequest()
        )
        states = {m.name: (m.state, m.error) for m in listing.models}
        assert states["broken"][0] == models_pb2.MODEL_STATE_FAILED
        assert "does not match its manifest" in states["broken"][1]
        assert states["moderation"][0] == models_pb2.MODEL_STATE_SERVING

        inference = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await inference.Classify(pb.ClassifyRequest(model="broken", inputs=["x"]))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "model 'broken' failed to load" in caught.value.details()
        ok = await inference.Classify(pb.ClassifyRequest(model="moderation", inputs=["x"]))
        assert ok.results

        health = health_pb2_grpc.HealthStub(channel)
        per_model = await health.Check(
            health_pb2.HealthCheckRequest(service="sidecar.v1.Inference/broken")
        )
        overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert per_model.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert overall.status == health_pb2.HealthCheckResponse.SERVING


async def test_no_loadable_model_refuses_to_start(tmp_path: Path) -> None:
    from sidecar.errors import ConfigError

    settings = Settings(
        address="127.0.0.1:0",
        http_address="",
        metrics_address="127.0.0.1:0",
        models=(ModelSettings(path=tmp_path),),
    )
    with pytest.raises(ConfigError, match=r"no model could be loaded.*has no manifest.json"):
        async with serving(settings):
            pass


async def test_unexpected_load_errors_fail_only_that_model(
    classifier_dir: Path, multilabel_dir: Path, tmp_path: Path
) -> None:
    garbled = tmp_path / "garbled"
    shutil.copytree(classifier_dir, garbled)
    (garbled / "tokenizer.json").write_text("{not json")  # tokenizers raises its own error type
    settings = Settings(
        address="127.0.0.1:0",
        http_address="",
        metrics_address="127.0.0.1:0",
        models=(ModelSettings(path=garbled, name="garbled"), ModelSettings(path=multilabel_dir)),
        verify_checksums=False,
    )
    async with serving(settings) as server:
        assert server.registry.status("garbled").state.value == "failed"
        assert server.registry.status("garbled").error.endswith(
            "tokenizer.json is not a tokenizer the tokenizers library can read "
            "(key must be a string at line 1 column 2): export the model dir again"
        )
        assert server.registry.status("moderation").state.value == "serving"
