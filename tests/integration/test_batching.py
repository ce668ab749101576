"""Dynamic batching through the real server: shared batches change nothing a caller sees."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from sidecar.config import ModelSettings, Settings
from sidecar.models.manifest import read_manifest
from sidecar.runtime.threads import Lane
from sidecar.server import SidecarServer
from sidecar.serving.loader import load_model
from sidecar.serving.served import ServedModel
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.conftest import channel_to, serving

WORDS = ["refund", "invoice", "login", "crash", "slow", "charge", "export", "password", "upgrade"]


def texts(count: int) -> list[str]:
    """Texts of many different lengths, one over the model's 256-token limit."""
    out = []
    for i in range(count):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + (i * 13) % 90)]
        out.append(f"case {i}: " + " ".join(words))
    out[5] = "very long " * 300
    return out


def vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


async def test_64_concurrent_callers_get_what_each_text_gets_alone(
    inference: InferenceStub,
) -> None:
    inputs = texts(64)
    alone = [await inference.Embed(pb.EmbedRequest(inputs=[t])) for t in inputs]
    # Every other caller asks for raw (unnormalized) vectors: a per-call option in a shared batch.
    together = await asyncio.gather(
        *(
            inference.Embed(pb.EmbedRequest(inputs=[t], normalize=bool(i % 2)))
            for i, t in enumerate(inputs)
        )
    )
    for i, (single, shared) in enumerate(zip(alone, together, strict=True)):
        expected = vectors(single)
        if not i % 2:
            assert abs(float(np.linalg.norm(vectors(shared)[0])) - 1.0) > 1e-3
            expected = expected * np.linalg.norm(vectors(shared))
        np.testing.assert_allclose(vectors(shared), expected, atol=2e-5)
        assert shared.embeddings[0].token_count == single.embeddings[0].token_count
        assert shared.embeddings[0].truncated == single.embeddings[0].truncated
    assert together[5].embeddings[0].truncated
    # The callers really shared forward passes, and the time split says so.
    assert max(r.metadata.batch_size for r in together) > 1
    assert all(r.metadata.batch_size == 1 for r in alone)
    assert any(r.metadata.queue_us > 0 for r in together)


async def test_unary_batches_and_stream_items_share_one_queue(inference: InferenceStub) -> None:
    inputs = texts(24)
    alone = await inference.Classify(pb.ClassifyRequest(model="triage", inputs=inputs, top_k=0))

    async def stream() -> dict[str, pb.StreamResponse]:
        items = [
            pb.StreamRequest(
                id=str(i), classify=pb.ClassifyRequest(model="triage", inputs=[t], top_k=1)
            )
            for i, t in enumerate(inputs)
        ]
        return {r.id: r async for r in inference.Stream(iter(items))}

    unary = [
        inference.Classify(pb.ClassifyRequest(model="triage", inputs=inputs[i : i + 8], top_k=2))
        for i in range(0, 24, 8)
    ]
    streamed, *chunks = await asyncio.gather(stream(), *unary)
    for i, expected in enumerate(alone.results):
        best = expected.labels[0]
        got_stream = streamed[str(i)].classify.results[0].labels
        got_unary = chunks[i // 8].results[i % 8].labels
        assert [x.label for x in got_stream] == [best.label]
        assert [x.label for x in got_unary] == [x.label for x in expected.labels[:2]]
        assert got_unary[0].score == pytest.approx(best.score, abs=1e-5)


def test_the_session_server_adapts_its_passes_and_both_lanes_agree(server: SidecarServer) -> None:
    """The session server runs MiniLM on 2 threads with inference_workers at its default:
    its passes may run wide (both threads) or on half of them side by side, and the two
    sessions behind them give the same rows."""
    model = server.registry.resolve("minilm")
    assert isinstance(model, ServedModel)
    assert server.engines.lanes(model) == (Lane(1, 1), Lane(2, None))
    items = model.encode(texts(12), truncate=True)
    wide, narrow = model.infer(items), model.infer(items, threads=1)  # half of 2 threads
    np.testing.assert_allclose(narrow.rows, wide.rows, atol=2e-5)
    # A fixed worker count keeps one session: no second copy of the weights.
    manifest = read_manifest(model.model_dir)
    fixed = load_model("fixed", model.model_dir, manifest, "cpu", 2)
    assert isinstance(fixed, ServedModel)
    assert not fixed.backend.half_threads


@pytest.fixture(scope="module")
async def tight(minilm_dir: Path) -> AsyncIterator[InferenceStub]:
    """A server with a 4-input queue and 6 requests in progress at most."""
    settings = Settings(
        address="127.0.0.1:0",
        http_address="",
        metrics_address="127.0.0.1:0",
        models=(ModelSettings(path=minilm_dir),),
        max_client_batch_size=4,
        max_queue_size=4,
        max_concurrent_requests=6,
        max_batch_size=2,
        intra_op_threads=1,
        grace_period_s=1.0,
    )
    async with serving(settings) as server, channel_to(server) as channel:
        yield InferenceStub(channel)


async def test_overload_is_refused_at_once_and_the_server_goes_on(tight: InferenceStub) -> None:
    inputs = texts(40)

    calls = [tight.Embed(pb.EmbedRequest(inputs=[t, t]), timeout=30) for t in inputs]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert refused
    assert len(refused) < len(outcomes)
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        details = error.details() or ""
        assert "max_queue_size 4" in details or "max_concurrent_requests" in details
    reply = await tight.Embed(pb.EmbedRequest(inputs=["still serving"]))
    assert reply.dimensions == 384
