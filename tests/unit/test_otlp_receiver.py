"""The test OTLP receiver against the real OTel SDK and its OTLP/gRPC exporter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from tools.otlp_receiver import (
    KIND_INTERNAL,
    KIND_SERVER,
    STATUS_ERROR,
    STATUS_UNSET,
    OtlpReceiver,
)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture
def provider(receiver: OtlpReceiver) -> Iterator[TracerProvider]:
    # A provider of our own: the global one is never set in tests.
    tp = TracerProvider(resource=Resource.create({"service.name": "receiver-test"}))
    tp.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True))
    )
    yield tp
    tp.shutdown()


def test_endpoint_is_a_local_port(receiver: OtlpReceiver) -> None:
    assert receiver.endpoint == f"http://127.0.0.1:{receiver.port}"
    assert receiver.port > 0
    assert receiver.spans == []


def test_parent_child_attributes_and_link(receiver: OtlpReceiver, provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test.scope")
    with tracer.start_as_current_span("other") as other:
        other_ctx = other.get_span_context()
    with tracer.start_as_current_span("parent", kind=SpanKind.SERVER) as parent:
        parent_ctx = parent.get_span_context()
        with tracer.start_as_current_span(
            "child",
            attributes={
                "sidecar.model": "minilm",
                "sidecar.batch_size": 3,
                "ratio": 0.25,
                "sidecar.truncated": True,
                "gen_ai.response.finish_reasons": ["stop", "length"],
                "ids": [1, 2],
            },
            links=[Link(other_ctx, {"why": "shared batch"})],
        ) as child:
            child_ctx = child.get_span_context()
    assert provider.force_flush()

    receiver.wait_for_blocking(lambda s: s.name in {"parent", "child", "other"}, count=3)
    [got_parent] = receiver.named("parent")
    [got_child] = receiver.named("child")

    assert got_parent.trace_id == format(parent_ctx.trace_id, "032x")
    assert got_parent.span_id == format(parent_ctx.span_id, "016x")
    assert got_parent.parent_span_id == ""
    assert got_parent.kind == KIND_SERVER
    assert got_parent.status_code == STATUS_UNSET

    assert got_child.trace_id == got_parent.trace_id
    assert got_child.span_id == format(child_ctx.span_id, "016x")
    assert got_child.parent_span_id == got_parent.span_id
    assert got_child.kind == KIND_INTERNAL
    assert got_child.attributes == {
        "sidecar.model": "minilm",
        "sidecar.batch_size": 3,
        "ratio": 0.25,
        "sidecar.truncated": True,
        "gen_ai.response.finish_reasons": ["stop", "length"],
        "ids": [1, 2],
    }
    assert got_child.links == [
        (format(other_ctx.trace_id, "032x"), format(other_ctx.span_id, "016x"))
    ]
    assert got_child.link_attributes == [{"why": "shared batch"}]
    assert got_child.scope == "test.scope"
    assert got_child.resource["service.name"] == "receiver-test"
    assert 0 < got_child.start_ns <= got_child.end_ns
    assert got_parent.start_ns <= got_child.start_ns
    assert got_child.end_ns <= got_parent.end_ns
    assert receiver.children(got_parent) == [got_child]
    assert {s.name for s in receiver.trace(got_parent.trace_id)} == {"parent", "child"}


def test_error_status_and_exception_event(receiver: OtlpReceiver, provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test.scope")
    with tracer.start_as_current_span("failing", record_exception=False) as span:
        span.record_exception(ValueError("bad input"))
        span.set_status(Status(StatusCode.ERROR, "INVALID_ARGUMENT: bad input"))
    provider.force_flush()

    [got] = receiver.wait_for_blocking(lambda s: s.name == "failing")
    assert got.status_code == STATUS_ERROR
    assert got.status_message == "INVALID_ARGUMENT: bad input"
    [(event_name, event_attrs)] = got.events
    assert event_name == "exception"
    assert event_attrs["exception.type"] == "ValueError"


async def test_async_wait_for_does_not_block_the_loop(
    receiver: OtlpReceiver, provider: TracerProvider
) -> None:
    tracer = provider.get_tracer("test.scope")

    async def emit_later() -> None:
        await asyncio.sleep(0.05)
        with tracer.start_as_current_span("late"):
            pass
        await asyncio.to_thread(provider.force_flush)

    emitter = asyncio.create_task(emit_later())
    [got] = await receiver.wait_for(lambda s: s.name == "late", timeout=10)
    await emitter
    assert got.parent_span_id == ""
    assert receiver.export_calls >= 1


async def test_wait_for_times_out_naming_what_arrived(
    receiver: OtlpReceiver, provider: TracerProvider
) -> None:
    with provider.get_tracer("t").start_as_current_span("something"):
        pass
    await asyncio.to_thread(provider.force_flush)
    await receiver.wait_for(lambda s: s.name == "something")
    with pytest.raises(TimeoutError, match="something"):
        await receiver.wait_for(lambda s: s.name == "never", timeout=0.1)
    receiver.clear()
    assert receiver.spans == []


def test_spans_survive_stop() -> None:
    rx = OtlpReceiver().start()
    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=rx.endpoint, insecure=True)))
    with tp.get_tracer("t").start_as_current_span("kept"):
        pass
    tp.force_flush()
    rx.wait_for_blocking(lambda s: s.name == "kept")
    tp.shutdown()
    rx.stop()
    assert [s.name for s in rx.spans] == ["kept"]
    assert trace.get_tracer_provider() is not tp
