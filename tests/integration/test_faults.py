"""Faults inside the server: an inference error fails only the callers of that batch, with a
clear status, and the server goes on; a corrupt graph fails its model at load, with a log
line that says why, while the other models serve."""

from __future__ import annotations

import asyncio
import logging
import shutil
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.config import ModelSettings, Settings
from sidecar.server import SidecarServer
from sidecar.serving.served import ServedModel
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc
from tests.conftest import channel_to, serving


async def test_an_inference_error_fails_that_batch_and_the_server_goes_on(
    server: SidecarServer,
    inference: inference_pb2_grpc.InferenceStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = server.registry.resolve("minilm")
    assert isinstance(model, ServedModel)
    real_run = model.backend.run
    failures = 0

    def failing_once(feed: Any, threads: int | None = None) -> Any:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("injected: the device fell over")
        return real_run(feed, threads)

    monkeypatch.setattr(model.backend, "run", failing_once)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await inference.Embed(pb.EmbedRequest(inputs=["one", "two"]))
    # A server fault, not the caller's: INTERNAL with a reference to the log line, no traceback.
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert "ref" in failed.value.details()
    assert "Traceback" not in failed.value.details()
    assert "injected" not in failed.value.details()
    answers = await asyncio.gather(
        *(inference.Embed(pb.EmbedRequest(inputs=[f"after {i}"])) for i in range(4))
    )
    assert all(a.dimensions == 384 for a in answers)


async def test_a_corrupt_graph_fails_its_model_with_a_clear_log_line(
    classifier_dir: Path,
    multilabel_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(classifier_dir, corrupt)
    (corrupt / "model.onnx").write_bytes(b"this is not an ONNX graph")
    settings = Settings(
        address="127.0.0.1:0",
        http_address="",
        metrics_address="",
        # Checksums off, so the graph itself reaches ONNX Runtime and is refused there.
        verify_checksums=False,
        models=(ModelSettings(path=corrupt, name="corrupt"), ModelSettings(path=multilabel_dir)),
    )
    async with AsyncExitStack() as stack:
        with caplog.at_level(logging.ERROR):
            server = await stack.enter_async_context(serving(settings))
        status = server.registry.status("corrupt")
        assert status.state.value == "failed"
        assert "model.onnx" in status.error
        logged = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
        assert logged, caplog.text
        assert any("model.onnx" in line for line in logged), logged
        assert server.registry.status("moderation").state.value == "serving"
        async with channel_to(server) as channel:
            inference = inference_pb2_grpc.InferenceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await inference.Classify(pb.ClassifyRequest(model="corrupt", inputs=["x"]))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "model 'corrupt' failed to load" in refused.value.details()
            ok = await inference.Classify(pb.ClassifyRequest(model="moderation", inputs=["x"]))
            assert ok.results
