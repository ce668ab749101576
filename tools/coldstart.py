"""Measure cold start: launch `sidecar serve` on a model dir, time it until health says SERVING.

Each run is a fresh process (imports, checksum verification, session creation, warm-up
included); prints every run and the median.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(target: str, process: subprocess.Popen[bytes], timeout: float = 60) -> float:
    """Poll grpc.health.v1 on `target` until SERVING; returns the seconds waited."""
    started = time.perf_counter()
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.perf_counter() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"sidecar exited with {process.returncode} before SERVING")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - started
            except grpc.RpcError:
                pass
            time.sleep(0.01)
    raise RuntimeError(f"sidecar did not report SERVING within {timeout:.0f}s")


def one_run(model_dir: Path) -> float:
    """Seconds from process launch to SERVING."""
    address = f"127.0.0.1:{free_port()}"
    sidecar = Path(sys.executable).parent / "sidecar"
    started = time.perf_counter()
    command = [sidecar, "serve", "--model", str(model_dir), "--address", address]
    process = subprocess.Popen([*command, "--http-address=", "--log-level", "WARNING"])
    try:
        wait_serving(address, process)
        return time.perf_counter() - started
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times = [one_run(args.model_dir) for _ in range(args.runs)]
    for number, seconds in enumerate(times, 1):
        print(f"run {number}: {seconds:.2f}s")
    print(f"cold start to SERVING, median of {len(times)}: {statistics.median(times):.2f}s")


if __name__ == "__main__":
    main()
