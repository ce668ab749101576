"""Helpers for tests that run `sidecar serve` as a process, as users and Kubernetes do."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tools.coldstart import free_port, wait_serving

__all__ = ["BIN", "free_port", "start_sidecar", "stop_sidecar", "wait_serving"]

BIN = Path(sys.executable).parent


def start_sidecar(
    log: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`sidecar serve ARGS` with its log in a file (a pipe nobody reads could block it).

    The HTTP API stays off unless ARGS or `env` set its address: servers started side by
    side would all want its default port."""
    chosen = any(a.startswith("--http-address") for a in args) or "SIDECAR_HTTP_ADDRESS" in (
        env or {}
    )
    extra = () if chosen else ("--http-address=",)
    with log.open("wb") as sink:
        return subprocess.Popen([BIN / "sidecar", "serve", *args, *extra], stderr=sink, env=env)


def stop_sidecar(
    process: subprocess.Popen[bytes],
    timeout: float = 10,
    *,
    signum: signal.Signals = signal.SIGTERM,
) -> int:
    """Send `signum` unless the process has exited already and wait for the exit, with
    SIGKILL if that takes longer than `timeout`; returns the exit code.

    SIGTERM drains, as Kubernetes stops a pod. A test's cleanup sends SIGKILL: it has no
    need to wait for a drain, and a server the test left stuck might never finish one."""
    if process.poll() is None:
        process.send_signal(signum)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
