"""What the serving code reports as it runs: one place that feeds metrics and trace spans.

Metrics are always kept (cheap counters); spans only when a tracer provider is configured.
A call's child spans (tokenize, queue, inference, postprocess) are recorded once it is
answered, from the stamps the batcher took while the work ran, so the hot path never waits
on tracing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanContext, Tracer

from sidecar.domain import CallInfo
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Stamps, record, trace_id


class Truncatable(Protocol):
    """An encoded input, as far as its call's span cares."""

    @property
    def truncated(self) -> bool: ...


@dataclass(frozen=True)
class GenerationSpans:
    """How a generation went, for its span: wall-clock times in ns since the epoch."""

    input_tokens: int
    output_tokens: int
    finish: str
    ttft_s: float
    truncated: bool
    batch_size: int
    began_ns: int
    tokenized_ns: int
    started_ns: int
    ended_ns: int


# Enough of the inputs to recognise a call when log_inputs is on, never whole documents.
MAX_LOGGED_CHARS = 2000


class Telemetry:
    """Metrics and (optionally) traces of one server."""

    def __init__(self, metrics: Metrics, provider: Any | None, *, log_inputs: bool) -> None:
        self.metrics = metrics
        self.provider = provider
        self.tracer: Tracer | None = provider.get_tracer("sidecar") if provider else None
        self.log_inputs = log_inputs

    def batch(
        self,
        model: str,
        callers: list[SpanContext],
        size: int,
        tokens: int,
        padded_tokens: int,
        start_ns: int,
        end_ns: int,
        error: BaseException | None,
    ) -> SpanContext | None:
        """One forward pass: metrics, and a span of its own linked to every call it served."""
        self.metrics.batch(model, size, tokens, padded_tokens)
        if self.tracer is None:
            return None
        return record(
            self.tracer,
            "batch",
            start_ns,
            end_ns,
            {
                "sidecar.model": model,
                "sidecar.batch_size": size,
                "sidecar.input_tokens": tokens,
                "sidecar.padded_tokens": padded_tokens,
            },
            links=callers,
            error=error,
            root=True,
        )

    def describe(self, info: CallInfo, inputs: Sequence[str] = ()) -> None:
        """Name the model on the call's server span (and its text, only with log_inputs)."""
        span = trace.get_current_span()
        if not span.is_recording():
            return
        span.set_attributes(
            {
                "sidecar.model": info.model,
                "sidecar.backend": info.backend,
                "sidecar.device": info.device,
                "sidecar.revision": info.revision,
            }
        )
        if self.log_inputs and inputs:
            span.set_attribute("sidecar.inputs", "\n".join(inputs)[:MAX_LOGGED_CHARS])

    def batched(
        self,
        stamps: Stamps,
        info: CallInfo,
        items: Sequence[Truncatable],
        inputs: Sequence[str],
    ) -> None:
        """A batched call answered: its model and inputs on its span, queue time, and its
        child spans under the server span."""
        self.describe(info, inputs)
        answered_ns = time.time_ns()
        self.metrics.queued(info.model, max(stamps.started - stamps.enqueued, 0) / 1e9)
        tracer = self.tracer
        if tracer is None or not trace.get_current_span().is_recording():
            return
        trace.get_current_span().set_attributes(
            {
                "sidecar.batch_size": info.batch_size,
                "sidecar.input_tokens": stamps.input_tokens,
                "sidecar.padded_tokens": stamps.padded_tokens,
                "sidecar.truncated": any(item.truncated for item in items),
            }
        )
        record(tracer, "tokenize", *stamps.tokenize)
        record(tracer, "queue", stamps.enqueued, stamps.started)
        batch = [stamps.batch] if stamps.batch is not None else []
        record(
            tracer,
            "inference",
            stamps.started,
            stamps.inference_end,
            {"sidecar.batch_size": info.batch_size, "sidecar.padded_tokens": stamps.padded_tokens},
            links=batch,
        )
        record(tracer, "postprocess", stamps.inference_end, answered_ns)

    def generation(self, info: CallInfo, inputs: Sequence[str], ended: GenerationSpans) -> None:
        """A generation ended: tokens counted, and (when traced) its attributes and spans."""
        self.metrics.generated(info.model, ended.output_tokens)
        self.describe(info, inputs)
        span = trace.get_current_span()
        tracer = self.tracer
        if tracer is None or not span.is_recording():
            return
        span.set_attributes(
            {
                "gen_ai.usage.input_tokens": ended.input_tokens,
                "gen_ai.usage.output_tokens": ended.output_tokens,
                "gen_ai.response.finish_reasons": [ended.finish],
                "sidecar.time_to_first_token_ms": round(ended.ttft_s * 1000, 3),
                "sidecar.truncated": ended.truncated,
                "sidecar.batch_size": ended.batch_size,
            }
        )
        record(tracer, "tokenize", ended.began_ns, ended.tokenized_ns)
        record(tracer, "queue", ended.tokenized_ns, ended.started_ns)
        record(
            tracer,
            "inference",
            ended.started_ns,
            ended.ended_ns,
            {"gen_ai.usage.output_tokens": ended.output_tokens},
        )

    def answered(
        self, rpc: str, model: str, code: str, seconds: float, transport: str = "grpc"
    ) -> None:
        """One call or Stream item finished, with its transport's status code."""
        self.metrics.call(rpc, model, code, seconds, trace_id(), transport)

    def close(self) -> None:
        """Flush spans still buffered and stop the metrics endpoint."""
        if self.provider is not None:
            self.provider.shutdown()
        self.metrics.close()
