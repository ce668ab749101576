"""Prometheus metrics for the sidecar, on a registry of their own.

Each `Metrics` owns its `CollectorRegistry`, never the process-wide `REGISTRY`, so several
servers (as in the tests) can live in one process without their series clashing. The
serving code calls the recording methods on its hot path: each is a child lookup and an
increment or observation, guarded only by prometheus_client's own locks. Gauges that
describe live state (queue depth, generations running) are read from callbacks at scrape
time rather than pushed on every change.

The HTTP endpoint is prometheus_client's own server, which negotiates the format: plain
Prometheus text by default, OpenMetrics when the scraper sends
`Accept: application/openmetrics-text`. Only OpenMetrics carries exemplars, which is how
the `trace_id` on a request-latency observation reaches Grafana.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Buckets, in base units. Request latency spans a one-text embed (about a millisecond) to a
# long generation stream. Queue time starts far below a millisecond: an idle batcher hands a
# request on at once. Batch caps are powers of two in practice, so one bucket per doubling.
# A padding ratio of 0 gets its own bucket: a batch of equal lengths wastes nothing.
# fmt: off
REQUEST_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
QUEUE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
)
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(7))  # 1 .. 64
BATCH_TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 16))  # 16 .. 32768
PADDING_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0,
)
# fmt: on


def _split_address(address: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets) into its host and port."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics address must be 'host:port', got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


class Metrics:
    """The sidecar's Prometheus metrics and, when asked, the endpoint that serves them."""

    def __init__(self) -> None:
        """Create every metric on a fresh registry."""
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        registry = self.registry

        self._requests = Counter(
            "sidecar_requests_total",
            "Finished calls (each Stream item counts once), by RPC or HTTP route, model, status "
            "code (gRPC's name, or the HTTP status) and transport (grpc, http).",
            ("rpc", "model", "code", "transport"),
            registry=registry,
        )
        self._request_duration = Histogram(
            "sidecar_request_duration_seconds",
            "Time from receiving a call (or Stream item) to its response, queueing included.",
            ("rpc", "model", "transport"),
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self._queue_duration = Histogram(
            "sidecar_queue_duration_seconds",
            "Time a request waited in the model's queue before its batch started.",
            ("model",),
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self._batch_size = Histogram(
            "sidecar_batch_size",
            "Inputs per forward pass.",
            ("model",),
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self._batch_tokens = Histogram(
            "sidecar_batch_tokens",
            "Tokens per forward pass, padding included (batch size x padded length).",
            ("model",),
            buckets=BATCH_TOKEN_BUCKETS,
            registry=registry,
        )
        self._padding = Histogram(
            "sidecar_batch_padding_ratio",
            "Share of a forward pass's tokens that are padding (1 - real / padded tokens).",
            ("model",),
            buckets=PADDING_BUCKETS,
            registry=registry,
        )
        self._tokens = Counter(
            "sidecar_tokens_total",
            "Tokens processed: kind=input for real (unpadded) input tokens, "
            "kind=generated for tokens produced by generation.",
            ("model", "kind"),
            registry=registry,
        )
        self._queue_depth = Gauge(
            "sidecar_queue_depth",
            "Requests waiting in the model's queue, read at scrape time.",
            ("model",),
            registry=registry,
        )
        self._first_token = Histogram(
            "sidecar_time_to_first_token_seconds",
            "Time from receiving a generation request to its first generated token.",
            ("model",),
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self._inter_token = Histogram(
            "sidecar_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one generation.",
            ("model",),
            buckets=INTER_TOKEN_BUCKETS,
            registry=registry,
        )
        self._load_duration = Gauge(
            "sidecar_model_load_duration_seconds",
            "How long the model's last load took (files to ready, warm-up included).",
            ("model",),
            registry=registry,
        )
        self._generations = Gauge(
            "sidecar_generations_in_progress",
            "Generations running now, read at scrape time.",
            registry=registry,
        )
        self._cache_hits = Counter(
            "sidecar_result_cache_hits_total",
            "Encoder inputs answered from the result cache, without a forward pass.",
            ("model",),
            registry=registry,
        )
        self._cache_misses = Counter(
            "sidecar_result_cache_misses_total",
            "Encoder inputs looked up in the result cache and not found there.",
            ("model",),
            registry=registry,
        )
        self._cache_bytes = Gauge(
            "sidecar_result_cache_bytes",
            "Bytes the result cache holds (rows, keys and per-entry overhead), read at "
            "scrape time.",
            registry=registry,
        )
        self._shared = Counter(
            "sidecar_shared_inputs_total",
            "Encoder inputs answered by the forward pass of an identical input in flight "
            "(of another call, or earlier in the same one) instead of a pass of their own.",
            ("model",),
            registry=registry,
        )

    def serve(self, address: str) -> int:
        """Serve the metrics over HTTP at "host:port" and return the bound port; "" serves none."""
        if not address:
            return 0
        if self._server is not None:
            raise RuntimeError("metrics endpoint already serving")
        host, port = _split_address(address)
        # Its own daemon thread: a scrape never waits on the event loop, and vice versa.
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        """Stop the HTTP endpoint, if any, and free its port."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def call(
        self,
        rpc: str,
        model: str,
        code: str,
        seconds: float,
        trace_id: str | None = None,
        transport: str = "grpc",
    ) -> None:
        """Record one finished call or Stream item: its status code and its latency."""
        self._requests.labels(rpc, model, code, transport).inc()
        # The exemplar lets Grafana jump from a slow bucket to that call's trace.
        exemplar = {"trace_id": trace_id} if trace_id else None
        self._request_duration.labels(rpc, model, transport).observe(seconds, exemplar)

    def queued(self, model: str, seconds: float) -> None:
        """Record how long one request waited in the model's queue."""
        self._queue_duration.labels(model).observe(seconds)

    def batch(self, model: str, size: int, tokens: int, padded_tokens: int) -> None:
        """Record one forward pass: its inputs, its padded tokens and its real tokens."""
        self._batch_size.labels(model).observe(size)
        self._batch_tokens.labels(model).observe(padded_tokens)
        if padded_tokens > 0:  # an empty pass has no padding to speak of
            self._padding.labels(model).observe(1.0 - tokens / padded_tokens)
        self._tokens.labels(model, "input").inc(tokens)

    def queue_depth(self, model: str, depth: Callable[[], int]) -> None:
        """Report the model's queue depth from `depth`, called at each scrape."""
        self._queue_depth.labels(model).set_function(depth)

    def generated(self, model: str, tokens: int) -> None:
        """Count tokens produced by generation."""
        self._tokens.labels(model, "generated").inc(tokens)

    def first_token(self, model: str, seconds: float) -> None:
        """Record one generation's time to first token."""
        self._first_token.labels(model).observe(seconds)

    def inter_token(self, model: str, seconds: float) -> None:
        """Record the gap between two consecutive generated tokens."""
        self._inter_token.labels(model).observe(seconds)

    def model_loaded(self, model: str, seconds: float) -> None:
        """Record how long the model took to load."""
        self._load_duration.labels(model).set(seconds)

    def generations(self, running: Callable[[], int]) -> None:
        """Report generations in progress from `running`, called at each scrape."""
        self._generations.set_function(running)

    def looked_up(self, model: str, hits: int, misses: int) -> None:
        """Count one call's inputs found and not found in the result cache."""
        if hits:
            self._cache_hits.labels(model).inc(hits)
        if misses:
            self._cache_misses.labels(model).inc(misses)

    def shared(self, model: str, inputs: int) -> None:
        """Count inputs answered by an identical input's forward pass in flight."""
        self._shared.labels(model).inc(inputs)

    def result_cache_bytes(self, held: Callable[[], int]) -> None:
        """Report the result cache's size from `held`, called at each scrape."""
        self._cache_bytes.set_function(held)
