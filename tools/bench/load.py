"""A load generator, run in its own process: N callers for a fixed time, per-call latency.

    python -m tools.bench.load --target grpc://127.0.0.1:50051 --callers 16 --corpus c.json

Callers are asyncio tasks on one event loop; each sends its next text as soon as its last
call returns (a closed loop, as a service's request handlers would). Only calls that
finish inside the measured window (after the warm-up) are counted. Prints JSON on stdout.

The target's scheme names its API, so every server is driven by this one generator:
grpc:// the sidecar's Embed, openai:// its OpenAI-compatible HTTP route, http:// the naive
baseline's /embed, infinity:// Infinity's /embeddings, triton://host:port/model Triton's
KServe v2 HTTP/JSON inference. While timing, HTTP replies are read but not parsed, alike for
all; `--vectors` instead embeds each text of the corpus once and prints the vectors (the
bench's check against sentence-transformers).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc

Call = Callable[[list[str]], Awaitable[None]]


class Recorder:
    """Latencies and text counts of the calls that finished inside the measured window."""

    def __init__(self, start: float, end: float, min_calls: int = 0) -> None:
        self.start, self.end, self.min_calls = start, end, min_calls
        self.last = end
        self.latencies: list[float] = []
        self.texts = 0
        self.errors: dict[str, int] = {}

    def open(self, now: float) -> bool:
        """The window runs to `end`, or on until `min_calls` calls have finished in it."""
        return now < self.end or len(self.latencies) < self.min_calls

    def counts(self, finished: float) -> bool:
        # Completions inside the window: throughput stays right when calls outlast it.
        if self.start <= finished and self.open(finished):
            self.last = max(self.last, finished)
            return True
        return False

    @property
    def seconds(self) -> float:
        """How long the window ended up being."""
        return self.last - self.start


async def closed_loop(
    call: Call, texts: list[str], callers: int, per_call: int, rec: Recorder
) -> None:
    """`callers` tasks, each calling back to back with `per_call` texts until the window ends."""
    cursor = itertools.count()

    async def caller() -> None:
        while rec.open(began := time.perf_counter()):
            batch = [texts[next(cursor) % len(texts)] for _ in range(per_call)]
            try:
                await call(batch)
            except (grpc.aio.AioRpcError, aiohttp.ClientError) as exc:
                name = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                rec.errors[name] = rec.errors.get(name, 0) + 1
                await asyncio.sleep(0.05)  # a refusing server is not called in a hot loop
                continue
            finished = time.perf_counter()
            if rec.counts(finished):
                rec.latencies.append(finished - began)
                rec.texts += per_call

    await asyncio.gather(*(caller() for _ in range(callers)))


async def stream_loop(
    stub: inference_pb2_grpc.InferenceStub,
    model: str,
    texts: list[str],
    in_flight: int,
    rec: Recorder,
) -> None:
    """One Stream keeping `in_flight` single-text items outstanding until the window ends."""
    sent: dict[str, float] = {}
    room = asyncio.Semaphore(in_flight)
    done = asyncio.Event()

    async def requests() -> Any:
        for number in itertools.count():
            await room.acquire()
            if not rec.open(time.perf_counter()):
                done.set()
                return
            item = str(number)
            sent[item] = time.perf_counter()
            text = texts[number % len(texts)]
            yield pb.StreamRequest(id=item, embed=pb.EmbedRequest(model=model, inputs=[text]))

    call = stub.Stream(requests())
    async for reply in call:
        began = sent.pop(reply.id)
        if reply.HasField("error"):
            rec.errors[str(reply.error.code)] = rec.errors.get(str(reply.error.code), 0) + 1
        elif rec.counts(finished := time.perf_counter()):
            rec.latencies.append(finished - began)
            rec.texts += 1
        room.release()
        if done.is_set() and not sent:
            call.cancel()
            break


@dataclass(frozen=True)
class HttpApi:
    """How one HTTP server is asked for embeddings and where its reply holds them."""

    url: str
    body: Callable[[list[str]], dict[str, Any]]
    vectors: Callable[[Any], list[list[float]]]


def _openai_vectors(reply: Any) -> list[list[float]]:
    return [item["embedding"] for item in reply["data"]]


def _triton_vectors(reply: Any) -> list[list[float]]:
    (output,) = reply["outputs"]
    rows, width = output["shape"]
    data = output["data"]
    return [data[i * width : (i + 1) * width] for i in range(rows)]


def http_api(target: str, model: str) -> HttpApi:
    """The API a non-gRPC target's scheme names."""
    scheme, _, rest = target.partition("://")
    address, _, path = rest.partition("/")
    base = f"http://{address}"
    if scheme == "openai":
        return HttpApi(
            f"{base}/v1/embeddings", lambda b: {"input": b, "model": model}, _openai_vectors
        )
    if scheme == "infinity":
        return HttpApi(
            f"{base}/embeddings", lambda b: {"input": b, "model": model}, _openai_vectors
        )
    if scheme == "triton":

        def triton(batch: list[str]) -> dict[str, Any]:
            text = {"name": "text", "shape": [len(batch), 1], "datatype": "BYTES", "data": batch}
            return {"inputs": [text]}

        return HttpApi(f"{base}/v2/models/{path}/infer", triton, _triton_vectors)
    if scheme == "http":
        return HttpApi(f"{base}/embed", lambda b: {"inputs": b}, lambda reply: reply["embeddings"])
    raise SystemExit(f"unknown target scheme in {target!r}")


async def run(args: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
    """Time the closed loop (or one Stream) against the target; the raw figures."""
    # Callers start at different places in the corpus, as independent clients would.
    start = time.perf_counter() + args.warmup
    rec = Recorder(start, start + args.duration, args.min_calls)
    scheme, _, address = args.target.partition("://")
    if scheme == "grpc":
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            if args.stream:
                await stream_loop(stub, args.model, texts, args.callers, rec)
            else:

                async def embed(batch: list[str]) -> None:
                    await stub.Embed(pb.EmbedRequest(model=args.model, inputs=batch), timeout=60)

                await closed_loop(embed, texts, args.callers, args.per_call, rec)
    else:
        api = http_api(args.target, args.model)
        limit = aiohttp.TCPConnector(limit=args.callers)
        async with aiohttp.ClientSession(connector=limit) as session:

            async def post(batch: list[str]) -> None:
                async with session.post(api.url, json=api.body(batch)) as reply:
                    reply.raise_for_status()
                    await reply.read()

            await closed_loop(post, texts, args.callers, args.per_call, rec)
    return {
        "texts": rec.texts,
        "calls": len(rec.latencies),
        "seconds": rec.seconds,
        "latencies": rec.latencies,
        "errors": rec.errors,
    }


async def vectors(target: str, model: str, texts: list[str]) -> list[list[float]]:
    """Each text's embedding from the target, one text per call, as the load sends them."""
    scheme, _, address = target.partition("://")
    found: list[list[float]] = []
    if scheme == "grpc":
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for text in texts:
                answer = await stub.Embed(pb.EmbedRequest(model=model, inputs=[text]), timeout=60)
                found.append(list(answer.embeddings[0].values))
        return found
    api = http_api(target, model)
    async with aiohttp.ClientSession() as session:
        for text in texts:
            async with session.post(api.url, json=api.body([text])) as reply:
                reply.raise_for_status()
                found += api.vectors(await reply.json(content_type=None))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target",
        required=True,
        help="grpc://, openai:// (the sidecar's HTTP API), http:// (naive), infinity:// or "
        "triton://host:port/model",
    )
    parser.add_argument("--model", default="")
    parser.add_argument("--corpus", required=True)
    parser.add_argument(
        "--callers", type=int, default=1, help="callers (in-flight items on Stream)"
    )
    parser.add_argument("--per-call", type=int, default=1, help="texts per call")
    parser.add_argument("--stream", action="store_true", help="one Stream instead of unary calls")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--min-calls", type=int, default=0, help="keep the window open until this many finish"
    )
    parser.add_argument(
        "--vectors", action="store_true", help="print each text's embedding instead of timing"
    )
    args = parser.parse_args()
    texts = json.loads(Path(args.corpus).read_text())
    if args.vectors:
        print(json.dumps(asyncio.run(vectors(args.target, args.model, texts))))
    else:
        print(json.dumps(asyncio.run(run(args, texts))))


if __name__ == "__main__":
    main()
