"""Overload a running sidecar and account for every call: `make soak` (200 callers, 30 s).

Each caller sends Embed calls back to back, every one with a deadline, for the duration.
Every call must end with OK, RESOURCE_EXHAUSTED (refused at once by the server's limits)
or DEADLINE_EXCEEDED, none may be lost (issued = ended) and none may hang past its
deadline plus a margin. Reports the codes, latency of the OK calls, and the server's RSS
and open file descriptors before and after (from /proc when it runs on this machine).

`--mixed` (`make soak-mixed`) has each caller go round every kind of call instead: Embed,
Tokenize, a Stream of several items, a generation, bad inputs, a generation cancelled after
its first token, and calls with a 1 ms deadline, each held to the codes it may end with.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from sidecar.config import Settings
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc
from tools.coldstart import free_port, wait_serving

# Seconds a well-behaved caller waits before trying again (docs/limits.md): a little after
# a full server's refusal; longer from one that is stopping, or after a call gRPC cancelled
# in the instant the server stopped (retried like UNAVAILABLE).
BACK_OFF = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: 0.01,
    grpc.StatusCode.UNAVAILABLE: 0.05,
    grpc.StatusCode.CANCELLED: 0.05,
}
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
                text = TEXTS[(number + tally.issued) % len(TEXTS)]
                call = embed(pb.EmbedRequest(model=model, inputs=[text]), timeout=deadline_s)
                await account(tally, allowed, call, deadline_s + margin_s)

        await asyncio.gather(*(caller(n) for n in range(callers)))
    return tally


async def account(
    tally: Tally, allowed: frozenset[grpc.StatusCode], call: Awaitable[object], overdue_s: float
) -> None:
    """Make one call and record in `tally` how it ended; a refused caller backs off."""
    tally.issued += 1
    began = time.monotonic()
    try:
        await call
        code, details = grpc.StatusCode.OK, ""
        tally.ok_seconds.append(time.monotonic() - began)
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
    except _ItemError as exc:
        code, details = exc.code, str(exc)
    except Exception as exc:  # a wrong answer is a defect: counted, not raised
        code, details = grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"
    if code not in allowed:
        tally.unexpected.append(f"{code.name}: {details}")
    elif code in BACK_OFF:
        await asyncio.sleep(BACK_OFF[code])  # a refused caller backs off, as told
    if time.monotonic() - began > overdue_s:
        tally.overdue += 1
    tally.codes[code.name] += 1


@dataclass(frozen=True)
class Kind:
    """One kind of call the mixed soak makes, and the codes it may end with."""

    name: str
    allowed: frozenset[grpc.StatusCode]


# The server's default max_concurrent_generations, all of which must be free after a soak.
GENERATION_SLOTS = Settings().max_concurrent_generations
BUSY = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED})
OK = grpc.StatusCode.OK
KINDS = (
    Kind("embed", BUSY | {OK}),
    Kind("tokenize", BUSY | {OK}),
    Kind("stream", BUSY | {OK}),
    Kind("generate", BUSY | {OK}),
    Kind("bad-input", BUSY | {grpc.StatusCode.INVALID_ARGUMENT}),
    # Cancelled by the caller after the first token, or refused before it came.
    Kind("cancelled", BUSY | {grpc.StatusCode.CANCELLED, OK}),
    Kind("1ms-deadline", BUSY | {OK}),
)


async def _stream(
    stub: inference_pb2_grpc.InferenceStub, text: str, models: tuple[str, str], t: float
) -> None:
    """A Stream of an embed, a tokenize and a generate item, each of which must answer."""
    embed_model, generate_model = models
    items = [
        pb.StreamRequest(id="e", embed=pb.EmbedRequest(model=embed_model, inputs=[text])),
        pb.StreamRequest(id="t", tokenize=pb.TokenizeRequest(model=embed_model, inputs=[text])),
        pb.StreamRequest(
            id="g",
            generate=pb.GenerateRequest(model=generate_model, prompt=text, max_new_tokens=4),
        ),
    ]
    answered = set()
    call = stub.Stream(iter(items), timeout=t)
    try:
        async for answer in call:
            if answer.HasField("error"):
                raise _ItemError(_status(answer.error.code), answer.error.message)
            if answer.HasField("generate") and not answer.generate.finish_reason:
                continue  # a token of the generation, not its end
            answered.add(answer.id)
    finally:
        call.cancel()  # after an item's error, the rest of the stream is not awaited
    if answered != {"e", "t", "g"}:
        raise RuntimeError(f"a Stream answered {sorted(answered)} of e, t, g")


async def _cancelled(
    stub: inference_pb2_grpc.InferenceStub, text: str, model: str, t: float
) -> None:
    """A generation its caller cancels after the first token."""
    request = pb.GenerateRequest(model=model, prompt=text, max_new_tokens=64)
    call = stub.Generate(request, timeout=t)
    async for _ in call:
        call.cancel()
        break
    if call.cancelled():
        raise _ItemError(grpc.StatusCode.CANCELLED, "cancelled by the caller")


async def _one(
    kind: str, stub: inference_pb2_grpc.InferenceStub, text: str, models: tuple[str, str], t: float
) -> None:
    """One call of `kind`; raises AioRpcError with its code, returns on OK."""
    embed_model, generate_model = models
    if kind == "embed":
        await stub.Embed(pb.EmbedRequest(model=embed_model, inputs=[text]), timeout=t)
    elif kind == "tokenize":
        await stub.Tokenize(pb.TokenizeRequest(model=embed_model, inputs=[text]), timeout=t)
    elif kind == "stream":
        await _stream(stub, text, models, t)
    elif kind == "generate":
        request = pb.GenerateRequest(model=generate_model, prompt=text, max_new_tokens=8)
        async for _ in stub.Generate(request, timeout=t):
            pass
    elif kind == "bad-input":
        await stub.Embed(pb.EmbedRequest(model=embed_model, inputs=[text, " "]), timeout=t)
    elif kind == "cancelled":
        await _cancelled(stub, text, generate_model, t)
    else:
        await stub.Embed(pb.EmbedRequest(model=embed_model, inputs=[text]), timeout=0.001)


class _ItemError(Exception):
    """A call that ended with a code without raising AioRpcError (a Stream item, a cancel)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


def _status(number: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)


async def slots_freed(address: str, generate_model: str, generations: int) -> list[str]:
    """`generations` Generate calls at once, after the soak: each must be served, which
    they are only if every cancelled, refused or timed-out generation gave its slot back.
    Returns the failures."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(model=generate_model, prompt=TEXTS[0], max_new_tokens=2)

        async def one() -> str:
            try:
                async for _ in stub.Generate(request, timeout=60):
                    pass
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
            return ""

        return [f for f in await asyncio.gather(*(one() for _ in range(generations))) if f]


async def mixed(
    address: str,
    callers: int,
    seconds: float,
    models: tuple[str, str],
    deadline_s: float = 5.0,
    margin_s: float = 1.0,
) -> dict[str, Tally]:
    """Every caller goes round KINDS for `seconds`; a Tally per kind, every call accounted."""
    tallies = {kind.name: Tally() for kind in KINDS}
    stop = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def caller(number: int) -> None:
            turn = number
            while time.monotonic() < stop:
                kind = KINDS[turn % len(KINDS)]
                turn += 1
                call = _one(kind.name, stub, TEXTS[turn % len(TEXTS)], models, deadline_s)
                await account(tallies[kind.name], kind.allowed, call, deadline_s + margin_s)

        await asyncio.gather(*(caller(n) for n in range(callers)))
    return tallies


def open_fds(pid: int) -> int:
    """File descriptors a process on this machine holds open."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


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


def report_mixed(
    tallies: dict[str, Tally], seconds: float, before: tuple[float, int], after: tuple[float, int]
) -> str:
    lines = [f"mixed soak, {seconds:.0f} s"]
    for name, tally in tallies.items():
        codes = ", ".join(f"{code} {count}" for code, count in tally.codes.most_common())
        lines.append(
            f"  {name:<13} issued {tally.issued}, ended {tally.ended}, lost "
            f"{tally.issued - tally.ended}, hung {tally.overdue}: {codes}"
        )
        if tally.unexpected:
            lines.append(f"    UNEXPECTED: {tally.unexpected[:3]}")
    lines.append(
        f"server RSS before {before[0]:.0f} MiB, after {after[0]:.0f} MiB; "
        f"open fds before {before[1]}, after {after[1]}"
    )
    return "\n".join(lines)


def failed(tally: Tally) -> bool:
    """Any call lost, hung or ended with a code its kind may not end with."""
    return bool(tally.unexpected or tally.overdue or tally.issued != tally.ended)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path, help="model dir to serve (an embedding model)")
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--deadline", type=float, default=2.0, help="each call's deadline, s")
    parser.add_argument(
        "--max-concurrent-requests", type=int, default=64, help="the server's limit under test"
    )
    parser.add_argument("--mixed", action="store_true", help="every kind of call, not only Embed")
    parser.add_argument(
        "--generate-model", type=Path, help="--mixed: a generative model dir served beside it"
    )
    args = parser.parse_args()
    if args.mixed and args.generate_model is None:
        parser.error("--mixed needs --generate-model DIR (make soak-mixed passes SmolLM2)")
    address = f"127.0.0.1:{free_port()}"
    models = ["--model", f"embed={args.model_dir}"]
    if args.mixed:
        models += ["--model", f"generate={args.generate_model}"]
    command = [
        Path(sys.executable).parent / "sidecar",
        *("serve", *models, "--address", address),
        *("--metrics-address=", "--http-address=", "--log-level", "WARNING"),
        *("--max-concurrent-requests", str(args.max_concurrent_requests)),
    ]
    leaked: list[str] = []
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stderr=log)
        try:
            wait_serving(address, server, timeout=300)
            before = rss_mb(server.pid), open_fds(server.pid)
            began = time.monotonic()
            if args.mixed:
                tallies = asyncio.run(
                    mixed(address, args.callers, args.seconds, ("embed", "generate"))
                )
                leaked = asyncio.run(slots_freed(address, "generate", GENERATION_SLOTS))
            else:
                tallies = {
                    "embed": asyncio.run(load(address, args.callers, args.seconds, args.deadline))
                }
            took = time.monotonic() - began
            time.sleep(1.0)  # the server closes the callers' connection
            after = rss_mb(server.pid), open_fds(server.pid)
            if args.mixed:
                print(report_mixed(tallies, took, before, after))
                print(
                    f"{GENERATION_SLOTS} generations at once afterwards: {leaked or 'all served'}"
                )
            else:
                print(report(tallies["embed"], took, (before[0], after[0])))
                print(f"open fds before {before[1]}, after {after[1]}")
        finally:
            server.terminate()
            server.wait()
    raise SystemExit(1 if any(failed(t) for t in tallies.values()) or leaked else 0)


if __name__ == "__main__":
    main()
