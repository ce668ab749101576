"""Traces into a real OTLP receiver, metrics scraped from the Prometheus endpoint, JSON logs."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import ModelSettings, Settings
from sidecar.server import SidecarServer
from sidecar.telemetry.logs import JsonFormatter
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.conftest import channel_to, serving
from tools.otlp_receiver import OtlpReceiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SECRET = "my card number is 4111 1111 1111 1111"


@pytest.fixture(scope="module")
def receiver() -> AsyncIterator[OtlpReceiver]:
    with OtlpReceiver() as started:
        yield started  # type: ignore[misc]


@pytest.fixture(scope="module")
async def traced(
    receiver: OtlpReceiver, minilm_dir: Path, gpt2_dir: Path
) -> AsyncIterator[SidecarServer]:
    settings = Settings(
        address="127.0.0.1:0",
        http_address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
        models=(ModelSettings(path=minilm_dir), ModelSettings(path=gpt2_dir, name="writer")),
        intra_op_threads=1,
    )
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "support-api-sidecar",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    async with serving(settings, env) as server:
        yield server


def traceparent(span: str = CALLER_SPAN) -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{TRACE_ID}-{span}-01"), ("baggage", "tenant=acme"))


async def test_a_call_joins_the_callers_trace_with_its_child_spans(
    traced: SidecarServer, receiver: OtlpReceiver
) -> None:
    async with channel_to(traced) as channel:
        stub = InferenceStub(channel)
        await stub.Embed(pb.EmbedRequest(inputs=[SECRET, "short"]), metadata=traceparent())
    spans = await receiver.wait_for(
        lambda s: s.trace_id == TRACE_ID and s.name == "postprocess", timeout=10
    )
    ours = receiver.trace(TRACE_ID)
    (server,) = [s for s in ours if s.name == "/sidecar.v1.Inference/Embed"]
    assert server.parent_span_id == CALLER_SPAN
    assert server.resource["service.name"] == "support-api-sidecar"
    assert server.attributes["sidecar.model"] == "minilm"
    assert server.attributes["sidecar.backend"] == "onnx"
    assert server.attributes["sidecar.device"] == "cpu"
    assert server.attributes["sidecar.batch_size"] >= 1
    assert server.attributes["sidecar.input_tokens"] > 2
    assert server.attributes["sidecar.padded_tokens"] > 0
    assert server.attributes["sidecar.truncated"] is False
    children = {s.name: s for s in receiver.children(server)}
    assert set(children) >= {"tokenize", "queue", "inference", "postprocess"}
    assert children["tokenize"].end_ns <= children["queue"].end_ns <= children["inference"].end_ns
    # The forward pass has a span of its own, linked to the call it served.
    (link,) = children["inference"].links
    batch = await receiver.wait_for(lambda s: s.span_id == link[1], timeout=10)
    assert batch[0].name == "batch"
    assert (TRACE_ID, server.span_id) in batch[0].links
    assert batch[0].attributes["sidecar.model"] == "minilm"
    # No request text anywhere unless log_inputs is on.
    assert all(SECRET not in json.dumps(s.attributes) for s in receiver.spans)
    assert spans


async def test_an_http_call_joins_the_callers_trace_with_its_child_spans(
    traced: SidecarServer, receiver: OtlpReceiver
) -> None:
    caller = "00f067aa0ba902c1"
    # An async client: the server runs in this test's event loop.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{traced.http_port}") as http:
        answer = await http.post(
            "/v1/embeddings",
            json={"input": ["short"]},
            headers={"traceparent": traceparent(caller)[0][1]},
            timeout=30,
        )
    assert answer.status_code == 200
    (server,) = await receiver.wait_for(lambda s: s.parent_span_id == caller, timeout=10)
    assert server.trace_id == TRACE_ID
    assert server.name == "POST /v1/embeddings"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["sidecar.model"] == "minilm"
    await receiver.wait_for(
        lambda s: s.trace_id == TRACE_ID and s.parent_span_id == server.span_id, timeout=10
    )
    children = {s.name for s in receiver.children(server)}
    assert children >= {"tokenize", "queue", "inference", "postprocess"}


async def test_a_streamed_http_completion_is_one_span_to_its_end(
    traced: SidecarServer, receiver: OtlpReceiver
) -> None:
    caller = "00f067aa0ba902c2"
    body = {"model": "writer", "prompt": "x", "max_tokens": 5, "stream": True}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{traced.http_port}") as http:
        answer = await http.post(
            "/v1/completions",
            json=body,
            headers={"traceparent": traceparent(caller)[0][1]},
            timeout=30,
        )
    assert answer.text.endswith("data: [DONE]\n\n")
    (server,) = await receiver.wait_for(lambda s: s.parent_span_id == caller, timeout=10)
    assert server.name == "POST /v1/completions"
    assert server.attributes["gen_ai.usage.output_tokens"] == 5


async def test_errors_are_recorded_with_their_status(
    traced: SidecarServer, receiver: OtlpReceiver
) -> None:
    async with channel_to(traced) as channel:
        stub = InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Embed(
                pb.EmbedRequest(model="nope", inputs=["x"]),
                metadata=traceparent("00f067aa0ba902b8"),
            )
    (span,) = await receiver.wait_for(lambda s: s.parent_span_id == "00f067aa0ba902b8", timeout=10)
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


async def test_generation_records_tokens_and_time_to_first_token(
    traced: SidecarServer, receiver: OtlpReceiver
) -> None:
    async with channel_to(traced) as channel:
        stub = InferenceStub(channel)
        call = stub.Generate(
            pb.GenerateRequest(model="writer", prompt="Refund", max_new_tokens=5),
            metadata=traceparent("00f067aa0ba902b9"),
        )
        replies = [r async for r in call]
    (span,) = await receiver.wait_for(lambda s: s.parent_span_id == "00f067aa0ba902b9", timeout=10)
    assert span.name == "/sidecar.v1.Inference/Generate"
    assert span.attributes["gen_ai.usage.output_tokens"] == len(replies) == 5
    assert span.attributes["gen_ai.usage.input_tokens"] == replies[-1].usage.prompt_tokens
    assert span.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert span.attributes["sidecar.time_to_first_token_ms"] > 0
    assert {s.name for s in receiver.children(span)} >= {"tokenize", "queue", "inference"}


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[tuple[tuple[str, str], ...], float], **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for k, v in samples.items() if wanted <= set(k))


async def test_metrics_count_known_calls(traced: SidecarServer) -> None:
    before = scrape(traced.metrics_port)
    async with channel_to(traced) as channel:
        stub = InferenceStub(channel)
        for _ in range(3):
            await stub.Embed(pb.EmbedRequest(inputs=["a refund", "an invoice"]))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Embed(pb.EmbedRequest(inputs=[" "]))
        [
            _
            async for _ in stub.Generate(
                pb.GenerateRequest(model="writer", prompt="x", max_new_tokens=4)
            )
        ]
        items = [
            pb.StreamRequest(id=str(i), embed=pb.EmbedRequest(inputs=["refund"])) for i in range(2)
        ]
        items.append(pb.StreamRequest(id="bad", embed=pb.EmbedRequest(model="nope", inputs=["x"])))
        [_ async for _ in stub.Stream(iter(items))]
    after = scrape(traced.metrics_port)

    def grew(name: str, **labels: str) -> float:
        return total(after.get(name, {}), **labels) - total(before.get(name, {}), **labels)

    ok = {"rpc": "Embed", "model": "minilm", "code": "OK"}
    assert grew("sidecar_requests_total", **ok) == 3
    assert grew("sidecar_requests_total", rpc="Embed", code="INVALID_ARGUMENT") == 1
    assert grew("sidecar_requests_total", rpc="Generate", model="writer", code="OK") == 1
    assert grew("sidecar_request_duration_seconds_count", rpc="Embed", model="minilm") == 4 - 1
    assert grew("sidecar_requests_total", rpc="Stream.embed", model="minilm", code="OK") == 2
    assert grew("sidecar_requests_total", rpc="Stream.embed", model="nope", code="NOT_FOUND") == 1
    assert grew("sidecar_queue_duration_seconds_count", model="minilm") == 3 + 2
    assert grew("sidecar_batch_size_count", model="minilm") >= 3
    assert grew("sidecar_tokens_total", model="minilm", kind="input") > 6
    assert grew("sidecar_tokens_total", model="writer", kind="generated") == 4
    assert grew("sidecar_time_to_first_token_seconds_count", model="writer") == 1
    assert grew("sidecar_inter_token_latency_seconds_count", model="writer") == 3
    assert total(after["sidecar_queue_depth"], model="minilm") == 0
    assert total(after["sidecar_model_load_duration_seconds"], model="writer") > 0
    assert total(after["sidecar_generations_in_progress"]) == 0


def test_json_log_lines_carry_the_trace(caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    record = logging.LogRecord("sidecar", logging.INFO, __file__, 1, "served %s", ("x",), None)
    with tracer.start_as_current_span("call") as span:
        line = json.loads(JsonFormatter().format(record))
        context = span.get_span_context()
    assert line["message"] == "served x"
    assert line["level"] == "INFO"
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"
    outside = json.loads(JsonFormatter().format(record))
    assert "trace_id" not in outside
