"""The PyTorch fallback backend over gRPC: same contract, results within tolerance of ONNX."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from sidecar.config import ModelSettings, Settings
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import models_pb2
from sidecar.v1.inference_pb2_grpc import InferenceStub
from sidecar.v1.models_pb2_grpc import ModelsStub
from tests.conftest import channel_to, export_quietly, serving

TEXTS = [
    "Refund not received after 14 days.",
    "The app crashes whenever I upload a photo larger than 10 MB; please advise!",
    "Café déjà vu — 東京 🚀",
    "ok",
]


@pytest.fixture(scope="module")
def dirs(
    minilm_source: Path, classifier_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("both")
    return {
        "minilm": export_quietly(minilm_source, root / "minilm", name="minilm", backend="both"),
        "triage": export_quietly(classifier_source, root / "triage", backend="both"),
        "torch-only": export_quietly(classifier_source, root / "torch-only", backend="torch"),
    }


@pytest.fixture(scope="module")
async def channel(dirs: dict[str, Path]) -> AsyncIterator[grpc.aio.Channel]:
    settings = Settings(
        address="127.0.0.1:0",
        http_address="",
        metrics_address="127.0.0.1:0",
        models=(
            ModelSettings(path=dirs["minilm"], name="minilm-onnx", backend="onnx"),
            ModelSettings(path=dirs["minilm"], name="minilm-torch", backend="torch"),
            ModelSettings(path=dirs["triage"], name="triage-onnx", backend="onnx"),
            ModelSettings(path=dirs["triage"], name="triage-torch", backend="torch"),
            ModelSettings(path=dirs["torch-only"], name="auto-torch"),
            ModelSettings(path=dirs["torch-only"], name="onnx-missing", backend="onnx"),
        ),
        intra_op_threads=1,
    )
    async with serving(settings) as server, channel_to(server) as chan:
        yield chan


async def test_embeddings_match_the_onnx_backend(channel: grpc.aio.Channel) -> None:
    stub = InferenceStub(channel)
    onnx = await stub.Embed(pb.EmbedRequest(model="minilm-onnx", inputs=TEXTS))
    torch = await stub.Embed(pb.EmbedRequest(model="minilm-torch", inputs=TEXTS))
    for a, b in zip(onnx.embeddings, torch.embeddings, strict=True):
        np.testing.assert_allclose(a.values, b.values, atol=1e-4)
        assert (a.token_count, a.truncated) == (b.token_count, b.truncated)
    assert (onnx.metadata.backend, torch.metadata.backend) == ("onnx", "torch")
    assert torch.metadata.device == "cpu"


async def test_classifications_match_the_onnx_backend(channel: grpc.aio.Channel) -> None:
    stub = InferenceStub(channel)
    for torch_model in ("triage-torch", "auto-torch"):
        onnx = await stub.Classify(pb.ClassifyRequest(model="triage-onnx", inputs=TEXTS))
        torch = await stub.Classify(pb.ClassifyRequest(model=torch_model, inputs=TEXTS))
        for a, b in zip(onnx.results, torch.results, strict=True):
            assert [s.label for s in a.labels] == [s.label for s in b.labels]
            np.testing.assert_allclose(
                [s.score for s in a.labels], [s.score for s in b.labels], atol=1e-5
            )
        assert torch.metadata.backend == "torch"


async def test_a_backend_the_dir_cannot_serve_fails_that_model_only(
    channel: grpc.aio.Channel,
) -> None:
    models = ModelsStub(channel)
    listed = {m.name: m for m in (await models.ListModels(models_pb2.ListModelsRequest())).models}
    missing = listed["onnx-missing"]
    assert missing.state == models_pb2.MODEL_STATE_FAILED
    assert "holds no ONNX graph" in missing.error
    assert listed["auto-torch"].state == models_pb2.MODEL_STATE_SERVING
    assert listed["auto-torch"].backend == "torch"
