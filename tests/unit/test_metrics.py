"""The Prometheus endpoint, scraped over HTTP as Prometheus would scrape it."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.samples import Sample

from sidecar.telemetry.metrics import Metrics

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
OPENMETRICS = "application/openmetrics-text"


def scrape(port: int, accept: str | None = None) -> tuple[str, str]:
    """GET /metrics and return its content type and body."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept is not None:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


def samples(text: str, *, openmetrics: bool = False) -> list[Sample]:
    """Every sample in a scrape, parsed by the parser for its format."""
    parse = parse_openmetrics if openmetrics else parse_text
    return [sample for family in parse(text) for sample in family.samples]


def value(found: list[Sample], name: str, **labels: str) -> float:
    """The one sample called `name` with exactly these labels."""
    matches = [s.value for s in found if s.name == name and s.labels == labels]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
    return matches[0]


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    metrics = Metrics()
    yield metrics
    metrics.close()


@pytest.fixture
def recorded(metrics: Metrics) -> tuple[Metrics, int]:
    """A served Metrics with a known set of calls recorded."""
    port = metrics.serve("127.0.0.1:0")
    for seconds in (0.002, 0.004, 0.006):
        metrics.call("Embed", "m", "OK", seconds)
    metrics.call("Embed", "m", "INVALID_ARGUMENT", 0.0005)
    metrics.call("Generate", "g", "OK", 1.5, trace_id=TRACE_ID)
    metrics.queued("m", 0.0003)
    metrics.queued("m", 0.02)
    metrics.batch("m", size=3, tokens=30, padded_tokens=48)
    metrics.batch("m", size=1, tokens=16, padded_tokens=16)
    metrics.queue_depth("m", lambda: 7)
    metrics.generated("g", 5)
    metrics.generated("g", 3)
    metrics.first_token("g", 0.08)
    for seconds in (0.01, 0.02, 0.03):
        metrics.inter_token("g", seconds)
    metrics.model_loaded("m", 2.5)
    metrics.generations(lambda: 2)
    return metrics, port


def test_serve_binds_a_free_port_and_empty_address_serves_nothing(metrics: Metrics) -> None:
    assert Metrics().serve("") == 0
    port = metrics.serve("127.0.0.1:0")
    assert port > 0
    content_type, _ = scrape(port)
    assert content_type.startswith("text/plain")


@pytest.mark.parametrize("address", ["9090", "localhost", "localhost:http", ":9090", "h:99999"])
def test_a_malformed_address_is_refused(metrics: Metrics, address: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        metrics.serve(address)


def test_requests_are_counted_by_rpc_model_and_code(recorded: tuple[Metrics, int]) -> None:
    _, port = recorded
    found = samples(scrape(port)[1])
    ok = {"rpc": "Embed", "model": "m", "code": "OK", "transport": "grpc"}
    assert value(found, "sidecar_requests_total", **ok) == 3
    assert value(found, "sidecar_requests_total", **(ok | {"code": "INVALID_ARGUMENT"})) == 1
    embed = {"rpc": "Embed", "model": "m", "transport": "grpc"}
    assert value(found, "sidecar_request_duration_seconds_count", **embed) == 4
    assert value(found, "sidecar_request_duration_seconds_sum", **embed) == pytest.approx(0.0125)
    # 0.0005 falls in the first (1 ms) bucket, 0.002 by 2.5 ms, 0.004 by 5 ms, 0.006 by 10 ms.
    buckets = {"0.001": 1, "0.0025": 2, "0.005": 3, "0.01": 4, "60.0": 4, "+Inf": 4}
    for le, count in buckets.items():
        bucket = value(found, "sidecar_request_duration_seconds_bucket", **embed, le=le)
        assert bucket == count, le


def test_batches_queue_and_tokens(recorded: tuple[Metrics, int]) -> None:
    _, port = recorded
    found = samples(scrape(port)[1])
    assert value(found, "sidecar_queue_duration_seconds_count", model="m") == 2
    assert value(found, "sidecar_queue_duration_seconds_sum", model="m") == pytest.approx(0.0203)
    assert value(found, "sidecar_queue_duration_seconds_bucket", model="m", le="0.0005") == 1
    assert value(found, "sidecar_batch_size_count", model="m") == 2
    assert value(found, "sidecar_batch_size_sum", model="m") == 4
    assert value(found, "sidecar_batch_size_bucket", model="m", le="1.0") == 1
    assert value(found, "sidecar_batch_size_bucket", model="m", le="4.0") == 2
    assert value(found, "sidecar_batch_tokens_sum", model="m") == 64
    # 18 of 48 tokens were padding, then none: 0.375 and 0.
    assert value(found, "sidecar_batch_padding_ratio_sum", model="m") == pytest.approx(0.375)
    assert value(found, "sidecar_batch_padding_ratio_bucket", model="m", le="0.0") == 1
    assert value(found, "sidecar_batch_padding_ratio_bucket", model="m", le="0.4") == 2
    assert value(found, "sidecar_tokens_total", model="m", kind="input") == 46
    assert value(found, "sidecar_tokens_total", model="g", kind="generated") == 8
    assert value(found, "sidecar_queue_depth", model="m") == 7


def test_generation_and_load(recorded: tuple[Metrics, int]) -> None:
    _, port = recorded
    found = samples(scrape(port)[1])
    assert value(found, "sidecar_time_to_first_token_seconds_count", model="g") == 1
    assert value(found, "sidecar_time_to_first_token_seconds_sum", model="g") == 0.08
    assert value(found, "sidecar_time_to_first_token_seconds_bucket", model="g", le="0.05") == 0
    assert value(found, "sidecar_time_to_first_token_seconds_bucket", model="g", le="0.1") == 1
    assert value(found, "sidecar_inter_token_latency_seconds_count", model="g") == 3
    assert value(found, "sidecar_inter_token_latency_seconds_sum", model="g") == pytest.approx(0.06)
    assert value(found, "sidecar_model_load_duration_seconds", model="m") == 2.5
    assert value(found, "sidecar_generations_in_progress") == 2


def test_gauges_are_read_at_scrape_time(metrics: Metrics) -> None:
    port = metrics.serve("127.0.0.1:0")
    depth = [0]
    metrics.queue_depth("m", lambda: depth[0])
    assert value(samples(scrape(port)[1]), "sidecar_queue_depth", model="m") == 0
    depth[0] = 12
    assert value(samples(scrape(port)[1]), "sidecar_queue_depth", model="m") == 12


def test_help_and_types(recorded: tuple[Metrics, int]) -> None:
    _, port = recorded
    families = {family.name: family for family in parse_text(scrape(port)[1])}
    expected = {
        "sidecar_requests": "counter",
        "sidecar_request_duration_seconds": "histogram",
        "sidecar_queue_duration_seconds": "histogram",
        "sidecar_batch_size": "histogram",
        "sidecar_batch_tokens": "histogram",
        "sidecar_batch_padding_ratio": "histogram",
        "sidecar_tokens": "counter",
        "sidecar_queue_depth": "gauge",
        "sidecar_time_to_first_token_seconds": "histogram",
        "sidecar_inter_token_latency_seconds": "histogram",
        "sidecar_model_load_duration_seconds": "gauge",
        "sidecar_generations_in_progress": "gauge",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
        assert families[name].documentation, name


def test_openmetrics_carries_the_trace_id_exemplar(recorded: tuple[Metrics, int]) -> None:
    _, port = recorded
    content_type, text = scrape(port, accept=OPENMETRICS)
    assert content_type.startswith(OPENMETRICS)
    assert text.endswith("# EOF\n")
    found = samples(text, openmetrics=True)
    with_exemplar = [s for s in found if s.exemplar is not None]
    assert len(with_exemplar) == 1
    (bucket,) = with_exemplar
    assert bucket.name == "sidecar_request_duration_seconds_bucket"
    assert bucket.labels == {"rpc": "Generate", "model": "g", "transport": "grpc", "le": "2.5"}
    assert bucket.exemplar is not None
    assert bucket.exemplar.labels == {"trace_id": TRACE_ID}
    assert bucket.exemplar.value == 1.5
    # Counts agree with the plain-text scrape.
    ok = {"rpc": "Embed", "model": "m", "code": "OK", "transport": "grpc"}
    assert value(found, "sidecar_requests_total", **ok) == 3
    # Plain text has no exemplars: Prometheus without exemplar storage parses it as usual.
    assert TRACE_ID not in scrape(port)[1]


def test_two_instances_in_one_process_do_not_clash() -> None:
    first, second = Metrics(), Metrics()
    try:
        first_port = first.serve("127.0.0.1:0")
        second_port = second.serve("127.0.0.1:0")
        assert first_port != second_port
        first.call("Embed", "m", "OK", 0.01)
        first.call("Embed", "m", "OK", 0.01)
        second.call("Embed", "m", "OK", 0.01)
        ok = {"rpc": "Embed", "model": "m", "code": "OK", "transport": "grpc"}
        assert value(samples(scrape(first_port)[1]), "sidecar_requests_total", **ok) == 2
        assert value(samples(scrape(second_port)[1]), "sidecar_requests_total", **ok) == 1
    finally:
        first.close()
        second.close()


def test_close_frees_the_port() -> None:
    metrics = Metrics()
    port = metrics.serve("127.0.0.1:0")
    scrape(port)
    metrics.close()
    metrics.close()  # a second close is harmless
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    # SO_REUSEADDR as any server would set it: it tolerates the scrape's TIME_WAIT, not a
    # listener still bound to the port.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()
