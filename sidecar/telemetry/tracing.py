"""OpenTelemetry tracing, configured by the standard OTEL_* variables; nothing at all when off.

Tracing is on when OTEL_TRACES_EXPORTER names `otlp` or `console`, or when an OTLP endpoint
is set (OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT); off otherwise, and
when OTEL_SDK_DISABLED=true or the exporter is `none`. The SDK itself reads the rest:
OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*, the
exporter's endpoint, headers and TLS. The provider is the server's own, never the global one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, Status, StatusCode, Tracer

from sidecar.errors import ConfigError

SERVICE_NAME = "transformers-sidecar"
EXPORTERS = ("otlp", "console")


def _exporters(env: Mapping[str, str]) -> list[str]:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if named:
        names = [n.strip().lower() for n in named.split(",") if n.strip()]
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        names = ["otlp"]
    else:
        names = []
    names = [n for n in names if n != "none"]
    unknown = sorted(set(names) - set(EXPORTERS))
    if unknown:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER {named!r}: {', '.join(unknown)} not supported; use "
            f"{', '.join(EXPORTERS)} or none"
        )
    return names


def tracer_provider(env: Mapping[str, str]) -> Any | None:
    """A TracerProvider exporting as the environment says, or None when tracing is off."""
    names = _exporters(env)
    if not names:
        return None
    # The SDK is imported only when tracing is on: off costs neither imports nor threads.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    defaults = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(defaults))
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    return provider


def current_context() -> SpanContext:
    """The span context of the call being served (invalid when not traced)."""
    return trace.get_current_span().get_span_context()


def trace_id(context: SpanContext | None = None) -> str | None:
    """The current trace id in hex, for logs and exemplars; None when not traced."""
    context = context or current_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


def record(
    tracer: Tracer,
    name: str,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any] | None = None,
    *,
    links: Sequence[SpanContext] = (),
    error: BaseException | None = None,
    root: bool = False,
) -> SpanContext:
    """A finished child span of the current one (or a new trace's root), from times
    measured while the work ran."""
    span = tracer.start_span(
        name,
        # A batch serves many calls: its own trace, linked to each, never one call's child.
        context=otel_context.Context() if root else None,
        start_time=start_ns,
        attributes=dict(attributes or {}),
        links=[Link(c) for c in links if c.is_valid],
    )
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end(end_time=max(end_ns, start_ns))
    return span.get_span_context()


@dataclass(frozen=True)
class Stamps:
    """When a call's phases happened (time.time_ns), for its trace spans."""

    tokenize: tuple[int, int]
    enqueued: int
    started: int
    inference_end: int
    input_tokens: int
    padded_tokens: int  # of the largest batch the call ran in
    batch: SpanContext | None  # that batch's span
