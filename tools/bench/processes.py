"""Server processes for the bench: started, waited on until ready, stopped; their CPU read."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

# A peer loading torch and a model on 2 busy cores takes its time; past this it is stuck.
READY_S = 180


def run_child(command: list[str], what: str, timeout: float, **kwargs: object) -> str:
    """Run a child to its end and return its stdout; a failure or a hang stops the bench
    with the end of the child's stderr, not a bare exit status."""
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{what} did not finish within {timeout:.0f} s") from None
    if done.returncode:
        raise SystemExit(f"{what} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


@contextmanager
def process(
    command: list[str],
    ready: Callable[[], bool],
    what: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    log: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` until the block ends; enter the block once `ready()` says so.

    With `log`, the process's output goes to that file (peers log every request), and its
    tail is shown when the process fails to come up. The process leads a group of its own and
    the whole group is stopped at the end: a server's own children (tritonserver and its
    backend stubs under PyTriton) would otherwise outlive it, holding cores and ports.
    """
    sink = log.open("ab") if log else None
    child = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=sink, stderr=sink, start_new_session=True
    )
    try:
        until = time.monotonic() + READY_S
        while not ready():
            failed = None
            if child.poll() is not None:
                failed = f"{what} exited with {child.returncode} before it was ready"
            elif time.monotonic() > until:
                failed = f"{what} was not ready within {READY_S} s"
            if failed:
                tail = log.read_text(errors="replace")[-3000:] if log else ""
                raise SystemExit(f"{failed}{f'; the end of {log}:' if log else ''}\n{tail}")
            time.sleep(0.1)
        yield child
    finally:
        _signal_group(child, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            child.wait(30)
        _signal_group(child, signal.SIGKILL)  # whatever of the group is left
        child.wait()
        if sink:
            sink.close()


def _signal_group(child: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # the whole group has exited
        os.killpg(child.pid, sig)


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness check: GET `url` answers 2xx."""

    def ok() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as reply:
                return 200 <= int(reply.status) < 300
        except (urllib.error.URLError, OSError):
            return False

    return ok


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and every process below it."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone since the listing
            continue
        # The name field may hold spaces and parentheses: split after its closing one.
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(used.get(p, 0.0) for p in tree)


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Each process tree's CPU use while nothing calls it, as a share of one core."""
    before = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    return {name: (tree_cpu_seconds(pid) - before[name]) / seconds for name, pid in pids.items()}
