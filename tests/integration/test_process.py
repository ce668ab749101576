"""The `sidecar serve` process as users run it: start-up, client command, unix socket,
graceful SIGTERM, and no torch on the serving path."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc
from tests.processes import BIN, free_port, start_sidecar, stop_sidecar, wait_serving

pytestmark = pytest.mark.slow


HEALTH_PORT = free_port()


@pytest.fixture
def sidecar_process(
    minilm_dir: Path, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "SIDECAR_GRACE_PERIOD_S": "5"}
    process = start_sidecar(
        tmp_path / "serve.log",
        *("--model", str(minilm_dir), "--address", address),
        *("--health-address", f"127.0.0.1:{HEALTH_PORT}"),
        env=env,
    )
    try:
        wait_serving(address, process)
        yield address, process
    finally:
        stop_sidecar(process, signum=signal.SIGKILL)


def test_client_command_prints_an_embedding(
    sidecar_process: tuple[str, subprocess.Popen[bytes]],
) -> None:
    import json

    address, _ = sidecar_process
    done = subprocess.run(
        [BIN / "sidecar", "client", "--address", address, "embed", "some text"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    printed = json.loads(done.stdout)
    assert printed["dimensions"] == 384
    assert len(printed["embeddings"][0]["values"]) == 8
    assert printed["metadata"]["model"] == "minilm"
    failed = subprocess.run(
        [BIN / "sidecar", "client", "--address", address, "classify", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 1
    assert failed.stderr.startswith("FAILED_PRECONDITION: model 'minilm' does feature-extraction")


def test_client_generate_streams_text_and_onnx_serving_never_loads_torch(
    gpt2_dir: Path, tmp_path: Path
) -> None:
    import json

    address = f"127.0.0.1:{free_port()}"
    process = start_sidecar(
        tmp_path / "serve.log", "--model", f"writer={gpt2_dir}", "--address", address
    )
    try:
        wait_serving(address, process)
        done = subprocess.run(
            [
                BIN / "sidecar",
                "client",
                "--address",
                address,
                "generate",
                "Refund",
                "--max-new-tokens",
                "5",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        # The streamed text on its own line, then the last message as JSON.
        last = json.loads(done.stdout.split("\n", 1)[1])
        assert last["finish_reason"] == "FINISH_REASON_LENGTH"
        assert last["usage"]["completion_tokens"] == 5
        assert last["metadata"]["model"] == "writer"
        # The ONNX path serves without torch in the process at all.
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        assert "libtorch" not in maps
    finally:
        stop_sidecar(process, signum=signal.SIGKILL)


def test_client_entities_and_rerank_commands(
    token_classifier_dir: Path, cross_encoder_dir: Path, tmp_path: Path
) -> None:
    import json

    address = f"127.0.0.1:{free_port()}"
    process = start_sidecar(
        tmp_path / "serve.log",
        *("--model", f"ner={token_classifier_dir}", "--model", f"ranker={cross_encoder_dir}"),
        *("--address", address),
    )
    try:
        wait_serving(address, process)

        def client(*args: str) -> dict[str, object]:
            done = subprocess.run(
                [BIN / "sidecar", "client", "--address", address, *args],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            printed: dict[str, object] = json.loads(done.stdout)
            return printed

        found = client("--model", "ner", "entities", "Refund for Paris", "--aggregation", "none")
        assert len(found["results"]) == 1  # type: ignore[arg-type]
        ranked = client("--model", "ranker", "rerank", "refund", "a", "b", "c", "--top-n", "2")
        assert len(ranked["results"]) == 2  # type: ignore[arg-type]
        assert ranked["metadata"]["model"] == "ranker"  # type: ignore[index]
    finally:
        stop_sidecar(process, signum=signal.SIGKILL)


def test_health_listener_serves_only_health(
    sidecar_process: tuple[str, subprocess.Popen[bytes]],
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{HEALTH_PORT}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", "sidecar.v1.Inference", "sidecar.v1.Inference/minilm", "liveness"):
            status = check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as unknown:
            check(health_pb2.HealthCheckRequest(service="sidecar.v1.Nope"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        # Plain text and reachable beyond loopback in a pod: it must not expose inference.
        with pytest.raises(grpc.RpcError) as embed:
            inference_pb2_grpc.InferenceStub(channel).Embed(
                pb.EmbedRequest(inputs=["x"]), timeout=5
            )
        assert embed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The client command a `helm test` pod runs: exit status 0 only for SERVING.
    assert client_health("liveness").returncode == 0
    unknown_service = client_health("sidecar.v1.Nope")
    assert unknown_service.returncode == 1
    assert "NOT_FOUND" in unknown_service.stderr


def client_health(service: str) -> subprocess.CompletedProcess[str]:
    """`sidecar client health` against the probe listener."""
    address = f"127.0.0.1:{HEALTH_PORT}"
    command = [BIN / "sidecar", "client", "--address", address, "health", "--service", service]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(
    sidecar_process: tuple[str, subprocess.Popen[bytes]],
) -> None:
    address, process = sidecar_process
    probes = grpc.insecure_channel(f"127.0.0.1:{HEALTH_PORT}")
    with grpc.insecure_channel(address) as channel, probes:
        inference = inference_pb2_grpc.InferenceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        probe = health_pb2_grpc.HealthStub(probes).Check
        outbox: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        outbox.put(pb.StreamRequest(id="before", embed=pb.EmbedRequest(inputs=["one"])))
        stream = inference.Stream(iter(outbox.get, None))
        assert next(stream).id == "before"  # the stream is established and in flight
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        while health.Check(health_pb2.HealthCheckRequest(), timeout=1).status != not_serving:
            assert time.monotonic() < deadline, "health stayed SERVING after SIGTERM"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as refused:
            inference.Embed(pb.EmbedRequest(inputs=["new call"]), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down and takes no new calls" in refused.value.details()
        # The probe listener tells the kubelet: not ready, but alive (do not restart).
        draining = {
            name: probe(health_pb2.HealthCheckRequest(service=name), timeout=1).status
            for name in ("", "sidecar.v1.Inference", "sidecar.v1.Inference/minilm", "liveness")
        }
        assert draining == {
            "": not_serving,
            "sidecar.v1.Inference": not_serving,
            "sidecar.v1.Inference/minilm": not_serving,
            "liveness": health_pb2.HealthCheckResponse.SERVING,
        }
        draining_check = client_health("sidecar.v1.Inference")
        assert draining_check.returncode == 1
        assert '"status": "NOT_SERVING"' in draining_check.stdout
        # The in-flight stream is still served during the grace period.
        outbox.put(pb.StreamRequest(id="during", embed=pb.EmbedRequest(inputs=["two"])))
        outbox.put(None)
        answers = list(stream)
        assert [a.id for a in answers] == ["during"]
        assert answers[0].embed.dimensions == 384
    assert process.wait(timeout=10) == 0


def test_sigterm_while_models_load_exits_cleanly(
    smollm2_dir: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    """SmolLM2 takes seconds to load and warm up: the signal lands while it does."""
    log = tmp_path / "serve.log"
    address = f"127.0.0.1:{free_port()}"
    process = start_sidecar(
        log, *("--model", str(smollm2_dir), "--model", str(minilm_dir), "--address", address)
    )
    try:
        deadline = time.monotonic() + 60
        while "loading 2 model(s)" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server never began loading"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # Not waiting for the load (about 5 s here) to end: out within 3 s.
        assert process.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - signalled < 3, log.read_text()
        text = log.read_text()
        assert "shutting down while models are still loading" in text
        assert "model smollm2 ready" not in text
        assert "SERVING after" not in text
    finally:
        stop_sidecar(process, signum=signal.SIGKILL)


def test_unix_socket_and_cold_start(minilm_dir: Path, tmp_path: Path) -> None:
    socket_path = tmp_path / "sidecar.sock"
    started = time.monotonic()
    process = start_sidecar(
        tmp_path / "serve.log", "--model", str(minilm_dir), "--address", f"unix:{socket_path}"
    )
    try:
        wait_serving(f"unix:{socket_path}", process)
        cold_start = time.monotonic() - started
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            response = inference_pb2_grpc.InferenceStub(channel).Embed(
                pb.EmbedRequest(inputs=["over a unix socket"])
            )
        assert response.dimensions == 384
        # Owner and group may connect (the app shares the pod's fsGroup); nobody else.
        assert socket_path.stat().st_mode & 0o777 == 0o660
        # Reported, not asserted: timings belong to `make coldstart`, machines are noisy.
        print(f"\ncold start to SERVING (process launch included): {cold_start:.2f}s")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        log = (tmp_path / "serve.log").read_text()
        assert "SERVING after" in log
        assert "shutting down" in log
        assert "stopped" in log
    finally:
        stop_sidecar(process, signum=signal.SIGKILL)


def base_distributions() -> set[str]:
    """The base dependencies of pyproject.toml and everything they require (no extras)."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    todo = [Requirement(r) for r in project["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        requirement = todo.pop()
        dist = canonicalize_name(requirement.name)
        # Markers drop other platforms' and extras' requirements.
        if dist in seen or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(dist)
        todo += [Requirement(r) for r in metadata.requires(dist) or []]
    return seen


def test_serving_needs_only_the_base_install(minilm_dir: Path) -> None:
    script = f"""
import asyncio, json, sys
from importlib import metadata
from pathlib import Path
from sidecar.config import ModelSettings, Settings
from sidecar.server import SidecarServer
from sidecar.domain import EmbedRequest

async def main():
    model = ModelSettings(path=Path({str(minilm_dir)!r}))
    settings = Settings(address="127.0.0.1:0", http_address="", metrics_address="", models=(model,))
    server = await SidecarServer.start(settings)
    result = await server.dataplane.run(EmbedRequest(model="", inputs=["hello"]))
    await server.stop(grace=0)
    owners = metadata.packages_distributions()
    # Not needs: setuptools' .pth loads _distutils_hack at start-up in any venv, and grpc
    # imports grpc_tools only if it happens to be installed.
    # anyio imports sniffio only when it is installed.
    skip = {{"sidecar", "_distutils_hack", "grpc_tools", "sniffio"}}
    tops = {{m.split(".")[0] for m in sys.modules}} - set(sys.stdlib_module_names) - skip
    dists = {{d for t in tops for d in owners.get(t, [])}}
    print(json.dumps({{"dimensions": result.dimensions, "distributions": sorted(dists)}}))

asyncio.run(main())
"""
    import json

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(done.stdout)
    assert report["dimensions"] == 384
    from packaging.utils import canonicalize_name

    imported = {canonicalize_name(d) for d in report["distributions"]}
    assert not imported & {"torch", "transformers", "optimum", "optimum-onnx"}
    assert imported <= base_distributions(), imported - base_distributions()
