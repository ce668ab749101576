"""Overload a running sidecar and account for every call: `make soak` (200 callers, 30 s).

Each caller sends Embed calls back to back, every one with a deadline, for the duration.
Every call must end with OK, RESOURCE_EXHAUSTED (refused at once by the server's limits)
or DEADLINE_EXCEEDED, none may be lost (issued = ended) and none may hang past its
deadline plus a margin. Reports the codes, latency of the OK calls, and the server's RSS
before and after (from /proc when the server runs on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc
from tools.coldstart import free_port, wait_serving

# What an overloaded server may answer; anything else is a defect.
EXPECTED = frozenset(
    {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
)
TEXTS = [
    "Refund not received after 14 days",
    "App crashes on login since the last update, every time I open settings",
    "Change my email",
    "The invoice lists a plan I never subscribed to and support has not answered in a week",
]


@dataclass
class Tally:
    """What happened to every call."""

    issued: int = 0
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    ok_seconds: list[float] = field(default_factory=list)
    # Calls that took longer than their deadline plus the margin: hung.
    overdue: int = 0
    unexpected: list[str] = field(default_factory=list)

    @property
    def ended(self) -> int:
        return sum(self.codes.values())


async def load(
    address: str,
    callers: int,
    seconds: float,
    deadline_s: float = 2.0,
    margin_s: float = 1.0,
    model: str = "",
    allowed: frozenset[grpc.StatusCode] = EXPECTED,
) -> Tally:
    """`callers` concurrent callers on one channel for `seconds`; every call accounted for.
    A code outside `allowed` is kept in `unexpected`."""
    tally = Tally()
    stop = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        embed = inference_pb2_grpc.InferenceStub(channel).Embed

        async def caller(number: int) -> None:
            while time.monotonic() < stop:
                tally.issued += 1
                text = TEXTS[(number + tally.issued) % len(TEXTS)]
                began = time.monotonic()
                try:
                    await embed(pb.EmbedRequest(model=model, inputs=[text]), timeout=deadline_s)
                    code = grpc.StatusCode.OK
                    tally.ok_seconds.append(time.monotonic() - began)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    if code not in allowed:
                        tally.unexpected.append(f"{code.name}: {exc.details()}")
                    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(0.01)  # a refused caller backs off, as told
                if time.monotonic() - began > deadline_s + margin_s:
                    tally.overdue += 1
                tally.codes[code.name] += 1

        await asyncio.gather(*(caller(n) for n in range(callers)))
    return tally


def rss_mb(pid: int) -> float:
    """Resident set size of a process on this machine, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def report(tally: Tally, seconds: float, rss: tuple[float, float] | None) -> str:
    lines = [
        f"calls issued {tally.issued}, ended {tally.ended}, lost {tally.issued - tally.ended}, "
        f"hung {tally.overdue}, in {seconds:.0f} s",
        "codes: " + ", ".join(f"{name} {count}" for name, count in tally.codes.most_common()),
        f"OK latency p50 {percentile(tally.ok_seconds, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(tally.ok_seconds, 0.99) * 1000:.1f} ms",
    ]
    if rss:
        lines.append(f"server RSS before {rss[0]:.0f} MiB, after {rss[1]:.0f} MiB")
    if tally.unexpected:
        lines.append(f"UNEXPECTED: {tally.unexpected[:5]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path, help="model dir to serve (an embedding model)")
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--deadline", type=float, default=2.0, help="each call's deadline, s")
    parser.add_argument(
        "--max-concurrent-requests", type=int, default=64, help="the server's limit under test"
    )
    args = parser.parse_args()
    address = f"127.0.0.1:{free_port()}"
    command = [
        Path(sys.executable).parent / "sidecar",
        *("serve", "--model", str(args.model_dir), "--address", address),
        *("--metrics-address=", "--log-level", "WARNING"),
        *("--max-concurrent-requests", str(args.max_concurrent_requests)),
    ]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stderr=log)
        try:
            wait_serving(address, server)
            before = rss_mb(server.pid)
            began = time.monotonic()
            tally = asyncio.run(load(address, args.callers, args.seconds, args.deadline))
            took = time.monotonic() - began
            print(report(tally, took, (before, rss_mb(server.pid))))
        finally:
            server.terminate()
            server.wait()
    failed = tally.unexpected or tally.overdue or tally.issued != tally.ended
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
