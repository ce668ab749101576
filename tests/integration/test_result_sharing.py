"""Identical inputs once, through a real server and MiniLM: inputs in flight are computed
once for every caller, whoever leaves first, and the result cache answers repeats."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import ModelSettings
from sidecar.dataplane.result_cache import ENTRY_OVERHEAD
from sidecar.domain import EmbedRequest
from sidecar.server import SidecarServer
from sidecar.serving.served import ServedModel
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.conftest import channel_to, local_settings, serving

# About ten MiniLM rows: 384 floats, a key and the per-entry overhead each.
CACHE_BYTES = 10 * (384 * 4 + 120 + ENTRY_OVERHEAD)


@pytest.fixture(scope="module")
async def cached(minilm_dir: Path) -> AsyncIterator[SidecarServer]:
    """MiniLM with a small result cache, one forward pass at a time, metrics served."""
    settings = local_settings(
        ModelSettings(path=minilm_dir, name="minilm"),
        metrics_address="127.0.0.1:0",
        result_cache_bytes=CACHE_BYTES,
        inference_workers=1,
    )
    async with serving(settings) as server:
        yield server


@pytest.fixture(scope="module")
async def stub(cached: SidecarServer) -> AsyncIterator[InferenceStub]:
    async with channel_to(cached) as channel:
        yield InferenceStub(channel)


@pytest.fixture
def model(cached: SidecarServer) -> ServedModel:
    found = cached.registry.resolve("minilm")
    assert isinstance(found, ServedModel)
    return found


class Gate:
    """Holds every forward pass of the model until released; then runs it, or fails it."""

    def __init__(self, model: ServedModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self._open = threading.Event()
        self._fail = False
        real = model.backend.run

        def held(feed: Any, threads: int | None = None) -> Any:
            self.entered.set()
            self._open.wait(30)
            if self._fail:
                self._fail = False  # the held pass fails; the ones after it run
                raise RuntimeError("injected: the device fell over")
            return real(feed, threads)

        monkeypatch.setattr(model.backend, "run", held)

    def release(self, *, fail: bool = False) -> None:
        self._fail = fail
        self._open.set()


@pytest.fixture
def gate(model: ServedModel, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    held = Gate(model, monkeypatch)
    try:
        yield held
    finally:
        held.release()


def counter(server: SidecarServer, name: str, **labels: str) -> float:
    value = server.telemetry.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def until(condition: Callable[[], bool], what: str) -> None:
    # By the clock, not a count of polls: on a loaded machine each poll may take far longer.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")  # pragma: no cover


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def vector(reply: pb.EmbedResponse, index: int = 0) -> np.ndarray:
    return np.array(reply.embeddings[index].values, dtype=np.float32)


async def blocked(server: SidecarServer, stub: InferenceStub, gate: Gate) -> Any:
    """A call whose forward pass holds the only worker until the gate opens."""
    call = stub.Embed(pb.EmbedRequest(inputs=[unique("the blocker")]))
    await asyncio.to_thread(gate.entered.wait, 10)
    return call


async def test_identical_calls_in_flight_run_one_forward_pass(
    cached: SidecarServer, stub: InferenceStub, gate: Gate
) -> None:
    blocker = await blocked(cached, stub, gate)
    text = unique("refund not received after 14 days")
    tokens = counter(cached, "sidecar_tokens_total", model="minilm", kind="input")
    shared = counter(cached, "sidecar_shared_inputs_total", model="minilm")
    calls = [stub.Embed(pb.EmbedRequest(inputs=[text])) for _ in range(6)]
    # A batch call repeating the text twice shares it too.
    calls.append(stub.Embed(pb.EmbedRequest(inputs=[text, "another text", text])))
    await until(
        lambda: counter(cached, "sidecar_shared_inputs_total", model="minilm") == shared + 7,
        "7 inputs to join the first",
    )
    gate.release()
    first = await blocker
    replies = await asyncio.gather(*calls)
    expected = vector(replies[0])
    for reply in replies[:6]:
        np.testing.assert_array_equal(vector(reply), expected)
        assert reply.metadata.inference_us > 0
        assert reply.metadata.batch_size >= 1
    np.testing.assert_array_equal(vector(replies[6], 2), expected)
    own = replies[6].embeddings
    assert own[0].token_count == own[2].token_count == replies[0].embeddings[0].token_count
    # One pass for the text: the model saw its tokens once, and the other text's once.
    seen = first.embeddings[0].token_count + own[0].token_count + own[1].token_count
    grew = counter(cached, "sidecar_tokens_total", model="minilm", kind="input") - tokens
    assert grew == seen


async def test_the_first_caller_cancelling_leaves_the_others_answered(
    cached: SidecarServer, stub: InferenceStub, gate: Gate, model: ServedModel
) -> None:
    blocker = await blocked(cached, stub, gate)
    text = unique("app crashes on login")
    shared = counter(cached, "sidecar_shared_inputs_total", model="minilm")
    # A call that did not answer is counted under the model it asked for ("": the default).
    ended = {"rpc": "Embed", "model": "", "transport": "grpc"}
    cancelled = counter(cached, "sidecar_requests_total", code="CANCELLED", **ended)
    expired = counter(cached, "sidecar_requests_total", code="DEADLINE_EXCEEDED", **ended)
    first = stub.Embed(pb.EmbedRequest(inputs=[text]))
    await until(lambda: cached.dataplane.rows.in_flight == 2, "the first call's flight")
    hurried = stub.Embed(pb.EmbedRequest(inputs=[text]), timeout=0.3)
    second = stub.Embed(pb.EmbedRequest(inputs=[text]))
    await until(
        lambda: counter(cached, "sidecar_shared_inputs_total", model="minilm") == shared + 2,
        "the others to join",
    )
    first.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await hurried
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(
        lambda: (
            counter(cached, "sidecar_requests_total", code="CANCELLED", **ended) == cancelled + 1
            and counter(cached, "sidecar_requests_total", code="DEADLINE_EXCEEDED", **ended)
            == expired + 1
        ),
        "the server to see both leave",
    )
    gate.release()
    await blocker
    answer = await second
    direct = await asyncio.to_thread(model.direct, EmbedRequest(model="minilm", inputs=[text]))
    np.testing.assert_allclose(vector(answer), direct.embeddings[0].values, atol=2e-5)
    assert answer.metadata.inference_us > 0


async def test_inputs_everyone_left_never_cost_a_forward_pass(
    cached: SidecarServer, stub: InferenceStub, gate: Gate
) -> None:
    blocker = await blocked(cached, stub, gate)
    tokens = counter(cached, "sidecar_tokens_total", model="minilm", kind="input")
    text = unique("nobody waits for this one")
    calls = [stub.Embed(pb.EmbedRequest(inputs=[text])) for _ in range(2)]
    await until(lambda: cached.dataplane.rows.in_flight == 2, "the calls' flight")
    for call in calls:
        call.cancel()
    await until(lambda: cached.dataplane.rows.in_flight == 1, "the flight to be dropped")
    gate.release()
    first = await blocker
    grew = counter(cached, "sidecar_tokens_total", model="minilm", kind="input") - tokens
    assert grew == first.embeddings[0].token_count


async def test_a_failed_forward_pass_fails_every_caller_and_is_not_remembered(
    cached: SidecarServer, stub: InferenceStub, gate: Gate
) -> None:
    text = unique("the device falls over on this one")
    shared = counter(cached, "sidecar_shared_inputs_total", model="minilm")
    calls = [stub.Embed(pb.EmbedRequest(inputs=[text])) for _ in range(2)]
    await asyncio.to_thread(gate.entered.wait, 10)
    await until(
        lambda: counter(cached, "sidecar_shared_inputs_total", model="minilm") == shared + 1,
        "the second to join",
    )
    gate.release(fail=True)
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, grpc.aio.AioRpcError), outcome
        assert outcome.code() == grpc.StatusCode.INTERNAL
    gate_free = await stub.Embed(pb.EmbedRequest(inputs=[text]))
    assert gate_free.metadata.inference_us > 0  # computed, not a remembered failure


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        f"{sample.name}{sorted(sample.labels.items())}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


HITS = "sidecar_result_cache_hits_total[('model', 'minilm')]"
MISSES = "sidecar_result_cache_misses_total[('model', 'minilm')]"
OK = "sidecar_requests_total[('code', 'OK'), ('model', 'minilm'), ('rpc', 'Embed'), " + (
    "('transport', 'grpc')]"
)


async def test_a_repeat_is_answered_from_the_cache_with_the_same_vector(
    cached: SidecarServer, stub: InferenceStub
) -> None:
    text = unique("Refund not received")
    before = scrape(cached.metrics_port)
    computed = await stub.Embed(pb.EmbedRequest(inputs=[text]))
    middle = scrape(cached.metrics_port)
    # The uncased tokenizer gives the model the same ids: the same row, exactly.
    repeat = await stub.Embed(pb.EmbedRequest(inputs=[text.upper()]))
    after = scrape(cached.metrics_port)
    assert middle[MISSES] - before.get(MISSES, 0) == 1
    assert after[HITS] - middle.get(HITS, 0) == 1
    assert after[OK] - middle[OK] == 1  # counted like any call
    np.testing.assert_array_equal(vector(repeat), vector(computed))
    assert computed.metadata.inference_us > 0
    assert computed.metadata.batch_size == 1
    meta = repeat.metadata
    assert (meta.inference_us, meta.batch_size, meta.queue_us) == (0, 0, 0)
    assert meta.revision == computed.metadata.revision
    assert meta.tokenize_us > 0
    # Per-call options apply to the remembered row: unnormalized, scaled back.
    raw = await stub.Embed(pb.EmbedRequest(inputs=[text], normalize=False))
    assert scrape(cached.metrics_port)[HITS] - after[HITS] == 1
    norm = float(np.linalg.norm(vector(raw)))
    assert abs(norm - 1.0) > 1e-3
    np.testing.assert_allclose(vector(raw) / norm, vector(computed), atol=1e-6)
    # Another text is another row.
    other = await stub.Embed(pb.EmbedRequest(inputs=[text + " twice"]))
    assert other.metadata.inference_us > 0
    assert not np.array_equal(vector(other), vector(computed))


async def test_the_cache_holds_its_byte_bound_and_evicts_the_oldest(
    cached: SidecarServer, stub: InferenceStub
) -> None:
    oldest = unique("the oldest text")
    await stub.Embed(pb.EmbedRequest(inputs=[oldest]))
    others = [unique(f"text number {i}") for i in range(12)]
    await stub.Embed(pb.EmbedRequest(inputs=others))
    held = scrape(cached.metrics_port)["sidecar_result_cache_bytes[]"]
    assert CACHE_BYTES - (384 * 4 + 120 + ENTRY_OVERHEAD) < held <= CACHE_BYTES
    recent = await stub.Embed(pb.EmbedRequest(inputs=[others[-1]]))
    assert recent.metadata.inference_us == 0  # still there
    again = await stub.Embed(pb.EmbedRequest(inputs=[oldest]))
    assert again.metadata.inference_us > 0  # evicted: computed again


async def test_the_cache_is_off_by_default(server: SidecarServer) -> None:
    async with channel_to(server) as channel:
        stub = InferenceStub(channel)
        text = unique("asked twice of a server without a cache")
        for _ in range(2):
            reply = await stub.Embed(pb.EmbedRequest(inputs=[text]))
            assert reply.metadata.inference_us > 0
    assert server.dataplane.rows.cache is None
    assert counter(server, "sidecar_result_cache_misses_total", model="minilm") == 0
