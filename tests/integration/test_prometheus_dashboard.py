"""Every query of the Grafana dashboard, run by a real Prometheus scraping a live sidecar.

One server (MiniLM, the random GPT-2 as "writer", the result cache on, tracing into a real
OTLP receiver) and one Prometheus scraping its metrics endpoint every second. The test
sends known traffic in two rounds, one scrape apart (a series born with its first
observation has no increase that rate() can see until a second one), then evaluates each
panel's expression as Grafana would: its variables substituted, over the traffic's time
range, a range query for a time-series panel and an instant one for an instant panel. Each
must parse, return at least one series with a finite value, and carry every label its
legend names; a target that asks for exemplars must get some, with a trace_id. The
`model` variable is tried both as "All" (`.*`) and as every value its own label_values()
query returns, as Grafana sends a multi-value selection: a misspelt label in a matcher
passes the first (`.*` matches a missing label) and not the second.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from sidecar.config import ModelSettings
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.conftest import channel_to, local_settings, missing_tool, serving
from tools.coldstart import free_port
from tools.otlp_receiver import OtlpReceiver

if TYPE_CHECKING:
    from sidecar.v1.inference_pb2_grpc import InferenceAsyncStub

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm/transformers-sidecar/dashboards/transformers-sidecar.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SCRAPE_S = 1  # Prometheus's scrape interval, and the Grafana datasource's
STEP_S = SCRAPE_S  # $__interval: Grafana's step, never below the datasource's interval
# Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval).
RATE_INTERVAL_S = max(STEP_S + SCRAPE_S, 4 * SCRAPE_S)
LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
VARIABLE = re.compile(r"\$(?:\{([A-Za-z0-9_]+)(?::([A-Za-z]+))?\}|([A-Za-z0-9_]+))")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")
PROMQL_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|\[\]{}/]")


# --- the dashboard, read as Grafana reads it ------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One Prometheus query of a panel."""

    panel: str
    ref: str
    expr: str
    legend: str
    instant: bool
    exemplar: bool

    @property
    def name(self) -> str:
        """The panel's title and the query's refId, for messages."""
        return f"{self.panel!r} {self.ref}"

    @property
    def legend_labels(self) -> list[str]:
        """The labels the legend names, as {{label}}."""
        return LEGEND_LABEL.findall(self.legend)


def panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    stack = list(reversed(dashboard["panels"]))
    while stack:
        panel = stack.pop()
        yield panel
        stack.extend(reversed(panel.get("panels", [])))


def datasource_type(node: Mapping[str, Any]) -> str | None:
    """The type of a panel's or target's datasource, if it names one."""
    source = node.get("datasource")
    return source.get("type") if isinstance(source, dict) else None


def prometheus_targets(dashboard: Mapping[str, Any]) -> list[Target]:
    """The dashboard's PromQL targets. A target on another datasource is left out only when
    that datasource is Tempo (TraceQL: Prometheus cannot run it); any other kind fails."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            kind = datasource_type(target) or datasource_type(panel)
            if kind == "tempo":
                continue
            assert kind == "prometheus", f"{panel.get('title')!r}: datasource {kind!r}"
            found.append(
                Target(
                    panel=panel["title"],
                    ref=target.get("refId", "?"),
                    expr=target["expr"],
                    legend=target.get("legendFormat", ""),
                    instant=bool(target.get("instant")) and not target.get("range"),
                    exemplar=bool(target.get("exemplar")),
                )
            )
    return found


def multi_value(values: list[str]) -> str:
    """A multi-value selection as Grafana puts it in a PromQL regex matcher."""
    escaped = [PROMQL_REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """`expr` with Grafana's variables replaced; one it does not know is left as it is."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        return variables.get(name, match.group(0))

    return VARIABLE.sub(value, expr)


def builtins(range_s: float) -> dict[str, str]:
    """Grafana's own interval variables for a range of `range_s` seconds."""
    return {
        "__interval": f"{STEP_S}s",
        "__interval_ms": str(STEP_S * 1000),
        "__rate_interval": f"{RATE_INTERVAL_S}s",
        "__range": f"{math.ceil(range_s)}s",
        "__range_s": str(math.ceil(range_s)),
    }


# --- Prometheus -----------------------------------------------------------------------------


class Prometheus:
    """A Prometheus server on loopback, scraping one target, and its HTTP API."""

    def __init__(self, workdir: Path, target: str) -> None:
        """Start it scraping `target` ("host:port"); `wait_ready` waits for it to answer."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": "1s"},
                    "scrape_configs": [
                        {"job_name": "sidecar", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--enable-feature=exemplar-storage",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        """Whether /-/ready answers 200; fails with Prometheus's log once it has exited."""
        assert self.process.poll() is None, f"Prometheus exited:\n{self.log.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    async def wait_ready(self) -> None:
        """Until /-/ready answers 200, for some 30 s at most."""
        for _ in range(300):
            if await asyncio.to_thread(self.ready):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"not ready:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it takes longer than 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def api(self, path: str, **params: str | float) -> dict[str, Any]:
        """GET /api/v1/PATH: its JSON body, the error body of a 4xx included."""
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                body: dict[str, Any] = json.loads(r.read())
        except urllib.error.HTTPError as refused:
            body = json.loads(refused.read())
        return body

    def last_good_scrape(self) -> float:
        """When the last scrape of the sidecar that succeeded began (Unix time); 0 if none."""
        # A range selector's samples carry their scrape's time (an instant query's carry
        # the evaluation's).
        result = self.api("query", query='up{job="sidecar"}[10s]')["data"]["result"]
        good = [float(at) for at, up in (result[0]["values"] if result else []) if up == "1"]
        return max(good, default=0.0)

    async def scraped_after(self, moment: float) -> float:
        """Wait (some 20 s at most) for a good scrape of the sidecar begun after `moment` (Unix
        time), and return when it began. The first comes some 5 s after Prometheus starts:
        it hands new targets to its scrapers at most every 5 s."""
        for _ in range(100):
            if (at := await asyncio.to_thread(self.last_good_scrape)) > moment:
                return at
            await asyncio.sleep(0.2)
        raise AssertionError(f"no scrape:\n{self.log.read_text()[-4000:]}")


# --- the check ------------------------------------------------------------------------------


def finite(value: str) -> bool:
    """Whether a sample value from the API is a number (not NaN, not ±Inf)."""
    return math.isfinite(float(value))


def series_problems(target: Target, data: Mapping[str, Any]) -> list[str]:
    """What is wrong with a query's answer: no series, no number, a legend's label missing."""
    series = data["result"]
    if not series:
        return ["no series"]
    if data["resultType"] == "matrix":
        values = [v for s in series for _, v in s["values"]]
    else:
        values = [s["value"][1] for s in series]
    problems = [] if any(finite(v) for v in values) else [f"no finite value of {len(values)}"]
    for label in target.legend_labels:
        bare = [s["metric"] for s in series if not s["metric"].get(label)]
        if bare:
            problems.append(f"the legend's {{{{{label}}}}} missing from {bare[0]}")
    return problems


def check_target(
    prometheus: Prometheus, target: Target, variables: Mapping[str, str], start: float, end: float
) -> list[str]:
    """What is wrong with one target's query over [start, end]; [] when nothing is."""
    expr = substitute(target.expr, {**builtins(end - start), **variables})
    where = f"{target.name} with {dict(variables)}: {expr}"
    if "$" in expr:
        return [f"{where}: a variable Grafana would not replace"]
    if target.instant:
        answer = prometheus.api("query", query=expr, time=end)
    else:
        answer = prometheus.api("query_range", query=expr, start=start, end=end, step=STEP_S)
    if answer.get("status") != "success":
        return [f"{where}: {answer.get('errorType')}: {answer.get('error')}"]
    problems = [f"{where}: {problem}" for problem in series_problems(target, answer["data"])]
    if target.exemplar:
        found = prometheus.api("query_exemplars", query=expr, start=start, end=end)
        exemplars = [e for s in found.get("data") or [] for e in s["exemplars"]]
        if not any(e["labels"].get("trace_id") for e in exemplars):
            problems.append(f"{where}: asks for exemplars, got none with a trace_id")
    return problems


def selections(prometheus: Prometheus, dashboard: Mapping[str, Any]) -> list[dict[str, str]]:
    """The variable settings to try: every query variable on "All", then on every value
    its label_values() query returns. Textbox and datasource variables feed only the
    Tempo panel; any other kind of variable, or query, fails here."""
    every: dict[str, str] = {}
    listed: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        kind, name = variable["type"], variable["name"]
        if kind in ("datasource", "textbox"):
            continue
        assert kind == "query", f"variable {name!r}: type {kind!r} not handled"
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        matched = LABEL_VALUES.match(query)
        assert matched, f"variable {name!r}: {query!r} is not label_values(metric, label)"
        metric, label = matched.groups()
        answer = prometheus.api(f"label/{label}/values", **{"match[]": metric})
        assert answer["status"] == "success", f"variable {name!r}: {answer}"
        values = answer["data"]
        assert values, f"variable {name!r}: {query} has no values"
        assert variable.get("includeAll"), f"variable {name!r} has no All"
        every[name] = variable.get("allValue") or multi_value(values)
        listed[name] = multi_value(values)
    return [every, listed]


def check_dashboard(
    prometheus: Prometheus, dashboard: Mapping[str, Any], start: float, end: float
) -> list[str]:
    """Everything wrong with the dashboard's PromQL over [start, end]."""
    targets = prometheus_targets(dashboard)
    assert targets
    return [
        problem
        for variables in selections(prometheus, dashboard)
        for target in targets
        for problem in check_target(prometheus, target, variables, start, end)
    ]


# --- the sidecar, Prometheus and the traffic ------------------------------------------------


@dataclass(frozen=True)
class Scraped:
    """Prometheus after the traffic: what was sent ran within [start, end]."""

    prometheus: Prometheus
    start: float
    end: float


async def one_round(stub: InferenceAsyncStub, round_: int) -> None:
    """Embeds (repeated: cache hits; new: misses; twice in one call: shared), two refused
    calls and a generation."""
    for _ in range(3):
        await stub.Embed(pb.EmbedRequest(inputs=["a refund", "an invoice for last week's order"]))
    await stub.Embed(pb.EmbedRequest(inputs=[f"round {round_}", f"again {round_}"]))
    await stub.Embed(pb.EmbedRequest(inputs=[f"twice {round_}", f"twice {round_}"]))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Embed(pb.EmbedRequest(model="nope", inputs=["x"]))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Embed(pb.EmbedRequest(inputs=[" "]))
    request = pb.GenerateRequest(model="writer", prompt="Refund", max_new_tokens=4)
    assert len([r async for r in stub.Generate(request)]) == 4


@pytest.fixture(scope="module")
def installed() -> None:
    """Skips (fails under CI) unless the prometheus binary is there."""
    if not Path(PROMETHEUS).exists():
        missing_tool(
            "prometheus is not installed: it is Debian's `prometheus` package, which "
            "`make debian-tools` (run by `make test`) installs"
        )


@pytest.fixture(scope="module")
async def scraped(
    installed: None, minilm_dir: Path, gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Scraped]:
    """A sidecar that has served two rounds of traffic, and Prometheus having scraped it
    before, between and after them."""
    # Prometheus starts first, on the port the metrics endpoint will take: it hands a new
    # target to its scrapers only some 5 s after it starts, time the models spend loading.
    metrics_address = f"127.0.0.1:{free_port()}"
    settings = local_settings(
        ModelSettings(path=minilm_dir),
        ModelSettings(path=gpt2_dir, name="writer"),
        metrics_address=metrics_address,
        result_cache_bytes=1 << 20,  # for the result-cache panel
    )
    prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), metrics_address)
    try:
        await prometheus.wait_ready()
        with OtlpReceiver() as receiver:
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}  # for exemplars
            async with serving(settings, env) as server, channel_to(server) as channel:
                start = await prometheus.scraped_after(0)
                stub = InferenceStub(channel)
                await one_round(stub, 1)
                # A step of the range lands within STEP_S after the last scrape; its rate()
                # window must reach back to the scrape between the rounds. A round slowed by
                # a busy machine is run again rather than failing the module.
                for attempt in range(3):
                    between = await prometheus.scraped_after(time.time() + 0.2)
                    await one_round(stub, 2 + attempt)
                    after = await prometheus.scraped_after(time.time() + 0.2)
                    if after - between + STEP_S <= RATE_INTERVAL_S:
                        break
                else:
                    pytest.fail(f"three rounds each took longer than {RATE_INTERVAL_S} s")
                await asyncio.sleep(STEP_S)
                yield Scraped(prometheus, start - STEP_S, time.time())
    finally:
        prometheus.stop()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    """The dashboard the chart ships."""
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_every_dashboard_query_returns_its_panels_series(
    scraped: Scraped, dashboard: dict[str, Any]
) -> None:
    problems = check_dashboard(scraped.prometheus, dashboard, scraped.start, scraped.end)
    assert not problems, "\n".join(problems)
    # The model variable offers the models served.
    answer = scraped.prometheus.api("label/model/values", **{"match[]": "sidecar_requests_total"})
    assert {"minilm", "writer"} <= set(answer["data"])


def test_a_misspelt_metric_or_label_fails_the_check(
    scraped: Scraped, dashboard: dict[str, Any]
) -> None:
    mutated = copy.deepcopy(dashboard)
    edits = {
        # a metric name, a grouping label, a matcher's label, a variable, the syntax
        "Requests per second by RPC": ("sidecar_requests_total", "sidecar_request_total"),
        "Errors per second by code": ("sum by (code)", "sum by (status)"),
        "Queue depth": ('model=~"$model"', 'modle=~"$model"'),
        "Padding ratio": ("$model", "$modle"),
        "Generations in progress": ("sum(", "sum(("),
    }
    for panel in panels(mutated):
        if panel.get("title") in edits:
            old, new = edits[panel["title"]]
            target = panel["targets"][0]
            assert old in target["expr"], (panel["title"], target["expr"])
            target["expr"] = target["expr"].replace(old, new, 1)
    problems = check_dashboard(scraped.prometheus, mutated, scraped.start, scraped.end)
    for title in edits:
        assert any(f"{title!r}" in p for p in problems), (title, problems)
    # Nothing else is reported: each failure is the mutation's own.
    assert all(any(f"{title!r}" in p for title in edits) for p in problems), problems
