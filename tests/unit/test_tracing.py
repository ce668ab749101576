"""When tracing is on, what it exports with, and the dashboard's metrics exist."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import tracer_provider

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"},
        {"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"},
    ],
)
def test_tracing_is_off_unless_asked_for(env: dict[str, str]) -> None:
    assert tracer_provider(env) is None


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "otlp"},
        {"OTEL_TRACES_EXPORTER": "console"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"},
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"},
    ],
)
def test_tracing_is_on_with_an_exporter_or_an_endpoint(env: dict[str, str]) -> None:
    provider = tracer_provider(env)
    assert provider is not None
    provider.shutdown()


def test_an_unknown_exporter_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="zipkin not supported"):
        tracer_provider({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_the_sampler_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    provider = tracer_provider({"OTEL_TRACES_EXPORTER": "console"})
    assert provider is not None
    assert "0.25" in provider.sampler.get_description()
    provider.shutdown()


def test_a_server_without_tracing_never_imports_the_sdk() -> None:
    code = (
        "import sys, sidecar.server as s\n"
        "from sidecar.telemetry.tracing import tracer_provider\n"
        "assert tracer_provider({}) is None\n"
        "assert 'opentelemetry.sdk.trace' not in sys.modules, 'the SDK was imported'\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=60)


def test_the_dashboard_uses_only_metrics_the_sidecar_exports() -> None:
    dashboard = json.loads(
        (ROOT / "helm/transformers-sidecar/dashboards/transformers-sidecar.json").read_text()
    )
    text = json.dumps(dashboard)
    used = set(re.findall(r"\b(sidecar_[a-z_]+)", text))
    used = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    exported = {family.name for family in Metrics().registry.collect()}
    # Counters are collected under their name without _total.
    exported |= {f"{name}_total" for name in exported}
    assert used
    assert used <= exported, sorted(used - exported)
    assert all(panel.get("title") for panel in dashboard["panels"])
