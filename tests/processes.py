"""Helpers for tests that run `sidecar serve` as a process, as users and Kubernetes do."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_sidecar(
    log: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`sidecar serve ARGS` with its log in a file (a pipe nobody reads could block it)."""
    with log.open("wb") as sink:
        return subprocess.Popen([BIN / "sidecar", "serve", *args], stderr=sink, env=env)


def wait_serving(target: str, process: subprocess.Popen[bytes], timeout: float = 60) -> float:
    """Poll grpc.health.v1 until SERVING; returns seconds waited."""
    started = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise AssertionError(f"sidecar exited with {process.returncode} before SERVING")
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise AssertionError("sidecar did not report SERVING in time")
