"""A real OTLP/gRPC trace receiver: what the sidecar exports is what tests and `make bench` read.

The server is a synchronous ``grpc.server`` on its own threads, not ``grpc.aio``: the OTel
SDK's exporter and ``force_flush`` block the calling thread, so a receiver living on the
test's (session-scoped) event loop could deadlock against them. Tests on the loop use the
async :meth:`OtlpReceiver.wait_for`; plain tests use :meth:`OtlpReceiver.wait_for_blocking`.

Usage::

    with OtlpReceiver() as receiver:          # or ``async with``, or start() / stop()
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        ...
        [batch] = await receiver.wait_for(lambda s: s.name == "batch")
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

# Span kinds and status codes as OTLP numbers them, for readable assertions.
KIND_INTERNAL = trace_pb2.Span.SpanKind.SPAN_KIND_INTERNAL
KIND_SERVER = trace_pb2.Span.SpanKind.SPAN_KIND_SERVER
KIND_CLIENT = trace_pb2.Span.SpanKind.SPAN_KIND_CLIENT
STATUS_UNSET = trace_pb2.Status.StatusCode.STATUS_CODE_UNSET
STATUS_OK = trace_pb2.Status.StatusCode.STATUS_CODE_OK
STATUS_ERROR = trace_pb2.Status.StatusCode.STATUS_CODE_ERROR


@dataclass(frozen=True)
class SpanRecord:
    """One received span, flattened: ids in lowercase hex, attributes as plain values."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int  # KIND_* (OTLP SpanKind)
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace_id, span_id) of each linked span
    status_code: int  # STATUS_* (OTLP StatusCode)
    status_message: str
    resource: dict[str, Any]
    scope: str  # instrumentation scope name
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    link_attributes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_ns(self) -> int:
        """End minus start, in nanoseconds."""
        return self.end_ns - self.start_ns


def any_value(value: common_pb2.AnyValue) -> Any:
    """Decode an OTLP AnyValue into a plain Python value (None when unset)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return key_values(value.kvlist_value.values)
    return getattr(value, which)


def key_values(items: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    """Decode repeated OTLP KeyValue into a dict."""
    return {kv.key: any_value(kv.value) for kv in items}


def _flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[SpanRecord]:
    records = []
    for resource_spans in request.resource_spans:
        resource = key_values(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                records.append(
                    SpanRecord(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=key_values(span.attributes),
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        status_code=span.status.code,
                        status_message=span.status.message,
                        resource=resource,
                        scope=scope_spans.scope.name,
                        events=[(e.name, key_values(e.attributes)) for e in span.events],
                        link_attributes=[key_values(link.attributes) for link in span.links],
                    )
                )
    return records


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver._add(_flatten(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC TraceService on 127.0.0.1:<free port> that keeps every span it gets."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._spans: list[SpanRecord] = []
        self._exports = 0
        self._server: grpc.Server | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._port = 0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> OtlpReceiver:
        """Bind a free port and start serving."""
        if self._server is not None:
            raise RuntimeError("OtlpReceiver already started")
        self._executor = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-rx")
        server = grpc.server(self._executor)
        add_servicer = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
        add_servicer(_TraceService(self), server)  # type: ignore[no-untyped-call]
        self._port = server.add_insecure_port("127.0.0.1:0")
        if self._port == 0:
            raise RuntimeError("could not bind 127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving; spans received so far stay readable."""
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> OtlpReceiver:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- reading -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (0 before start)."""
        return self._port

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``, for OTEL_EXPORTER_OTLP_ENDPOINT or OTLPSpanExporter."""
        if self._port == 0:
            raise RuntimeError("OtlpReceiver not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def spans(self) -> list[SpanRecord]:
        """A snapshot of every span received, in arrival order."""
        with self._lock:
            return list(self._spans)

    @property
    def export_calls(self) -> int:
        """How many Export calls arrived (one per exporter batch)."""
        with self._lock:
            return self._exports

    def clear(self) -> None:
        """Forget the spans received so far."""
        with self._lock:
            self._spans.clear()

    def named(self, name: str) -> list[SpanRecord]:
        """The spans received so far with this name."""
        return [s for s in self.spans if s.name == name]

    def children(self, parent: SpanRecord) -> list[SpanRecord]:
        """The spans received so far whose parent is ``parent``."""
        return [
            s
            for s in self.spans
            if s.trace_id == parent.trace_id and s.parent_span_id == parent.span_id
        ]

    def trace(self, trace_id: str) -> list[SpanRecord]:
        """The spans received so far in one trace."""
        return [s for s in self.spans if s.trace_id == trace_id]

    def _add(self, records: list[SpanRecord]) -> None:
        with self._lock:
            self._spans.extend(records)
            self._exports += 1
            self._lock.notify_all()

    def _matching(self, predicate: Callable[[SpanRecord], bool]) -> list[SpanRecord]:
        return [s for s in self._spans if predicate(s)]

    def _timeout_error(self, count: int, timeout: float) -> TimeoutError:
        names = sorted({s.name for s in self.spans})
        return TimeoutError(
            f"fewer than {count} matching span(s) within {timeout}s; "
            f"received {len(self.spans)} span(s) named {names}"
        )

    async def wait_for(
        self,
        predicate: Callable[[SpanRecord], bool] = lambda _: True,
        # A plain number keeps the call one line in tests; the TimeoutError names what came.
        timeout: float = 10.0,  # noqa: ASYNC109
        count: int = 1,
    ) -> list[SpanRecord]:
        """Wait (without blocking the loop) until ``count`` spans match; return all matches.

        Raises TimeoutError, listing the span names that did arrive, when they do not.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with self._lock:
                found = self._matching(predicate)
            if len(found) >= count:
                return found
            if loop.time() >= deadline:
                raise self._timeout_error(count, timeout)
            await asyncio.sleep(0.02)

    def wait_for_blocking(
        self,
        predicate: Callable[[SpanRecord], bool] = lambda _: True,
        timeout: float = 10.0,
        count: int = 1,
    ) -> list[SpanRecord]:
        """Like :meth:`wait_for`, blocking the calling thread (never call it on the loop)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = self._matching(predicate)
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
        raise self._timeout_error(count, timeout)
