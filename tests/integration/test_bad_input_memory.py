"""Memory under bad input: a refused call leaves nothing for the garbage collector, and
thousands of bad requests to a `sidecar serve` process leave its memory where it was.

These count objects and resident memory: they stay in a module of their own, so that no
other test leaves objects in this process just before them."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import pytest

from sidecar.errors import SidecarError
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.integration.bad_input import (
    BAD_UTF8,
    INVALID,
    NOT_FOUND,
    ONE_MB,
    expect,
    length_delimited,
)
from tests.processes import free_port, start_sidecar, stop_sidecar, wait_serving


async def test_a_refused_call_leaves_nothing_for_the_garbage_collector(
    inference: InferenceStub,
) -> None:
    """A refused call's exception, frames and request are freed when it ends, not when the
    cyclic garbage collector next runs (context.abort() kept them in a reference cycle: a
    refused 1 MB input held its 140,000-token encodings until then)."""

    def suspects() -> dict[int, str]:
        found = {}
        for o in gc.get_objects():
            kind = type(o)  # not isinstance(): it reads __class__, which warns on some objects
            if issubclass(kind, SidecarError):
                found[id(o)] = f"{kind.__name__}: {o}"[:80]
            elif kind is FrameType and o.f_code.co_name in ("_encode", "wrapper"):
                found[id(o)] = f"frame {o.f_code.co_name}"
        return found

    gc.collect()
    gc.disable()
    try:
        earlier = suspects()  # alive for reasons of their own (an earlier test's, say)
        for _ in range(3):
            await expect(
                inference.Embed(pb.EmbedRequest(inputs=[ONE_MB], truncate=False), timeout=30),
                INVALID,
            )
            await expect(inference.Embed(pb.EmbedRequest(model="nope", inputs=["x"])), NOT_FOUND)
        # The tokenizing thread lets go of its work item (and the last exception) a moment
        # after the answer is out.
        await asyncio.sleep(0.5)
        left = [what for key, what in suspects().items() if key not in earlier]
    finally:
        gc.enable()
    assert not left, f"kept alive by reference cycles: {left}"


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def bad_requests(
    channel: grpc.Channel, stub: inference_pb2_grpc.InferenceStub
) -> Iterator[grpc.StatusCode]:
    """Bad requests of every kind, round and round; yields each one's status code (OK for a
    Stream whose items were refused one by one). The costly kinds (a whole 70 kB text
    tokenized, a message gRPC refuses) come every eighth round."""
    long_text = "refund " * 10_000  # 70 kB: 10,000 tokens, under the 128 KiB message limit
    raw_embed = channel.unary_unary("/sidecar.v1.Inference/Embed", lambda b: b, lambda b: b)
    raw_stream = channel.stream_stream("/sidecar.v1.Inference/Stream", lambda b: b, lambda b: b)
    bad_item = length_delimited(1, b"bad") + length_delimited(2, length_delimited(2, BAD_UTF8))

    def stream(items: list[pb.StreamRequest]) -> Any:
        return list(stub.Stream(iter(items), timeout=10))

    def gen(**fields: Any) -> Any:
        return list(stub.Generate(pb.GenerateRequest(model="gpt2", **fields), timeout=10))

    cheap = [
        lambda: stub.Embed(pb.EmbedRequest(inputs=[""]), timeout=10),
        lambda: stub.Embed(pb.EmbedRequest(inputs=[" \t"]), timeout=10),
        lambda: stub.Tokenize(pb.TokenizeRequest(inputs=["x"] * 9), timeout=10),
        lambda: raw_embed(length_delimited(2, BAD_UTF8), timeout=10),
        lambda: list(raw_stream(iter([bad_item]), timeout=10)),
        lambda: stub.ExtractEntities(
            pb.ExtractEntitiesRequest(inputs=["x"], aggregation=9),  # type: ignore[arg-type]
            timeout=10,
        ),
        lambda: gen(prompt="x", temperature=float("nan")),
        lambda: gen(prompt="x", top_p=2.0),
        lambda: gen(prompt="", max_new_tokens=-1),
        lambda: gen(prompt="x", max_new_tokens=2**31 - 1, truncate=False),
        lambda: stub.Embed(pb.EmbedRequest(model="nope", inputs=["x"]), timeout=10),
        lambda: stub.Classify(pb.ClassifyRequest(model="minilm", inputs=["x"]), timeout=10),
        lambda: stub.Classify(
            pb.ClassifyRequest(model="triage", inputs=["x"], top_k=-1), timeout=10
        ),
        lambda: stream(
            [
                pb.StreamRequest(id="a", embed=pb.EmbedRequest(inputs=["x"] * 8)),
                pb.StreamRequest(id="a", embed=pb.EmbedRequest(inputs=["x"])),
            ]
        ),
        lambda: stream(
            [pb.StreamRequest(id=f"n{i}") for i in range(20)]
            + [pb.StreamRequest(id="c", cancel=pb.CancelRequest())]
        ),
        lambda: stub.Embed(pb.EmbedRequest(inputs=["x"] * 8), timeout=0.001),
    ]
    costly = [
        lambda: stub.Embed(pb.EmbedRequest(inputs=[long_text], truncate=False), timeout=10),
        lambda: gen(prompt=long_text, truncate=False),
        lambda: stub.Embed(pb.EmbedRequest(inputs=["x" * 140_000]), timeout=10),
    ]
    for round_ in itertools.count():
        for kind in cheap + (costly if round_ % 8 == 0 else []):
            try:
                kind()
            except grpc.RpcError as err:
                yield err.code()  # type: ignore[attr-defined]
            else:
                yield grpc.StatusCode.OK


@pytest.mark.slow
def test_thousands_of_bad_requests_leave_memory_flat(
    minilm_dir: Path, classifier_dir: Path, gpt2_dir: Path, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    process = start_sidecar(
        tmp_path / "serve.log",
        *("--model", f"minilm={minilm_dir}", "--model", f"triage={classifier_dir}"),
        *("--model", f"gpt2={gpt2_dir}", "--address", address, "--metrics-address", ""),
        *("--max-client-batch-size", "8", "--max-message-bytes", str(128 * 1024)),
        *("--intra-op-threads", "1", "--log-level", "ERROR"),
        env={**os.environ, "SIDECAR_GRACE_PERIOD_S": "1"},
    )
    try:
        wait_serving(address, process)
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            codes = bad_requests(channel, stub)
            began = time.monotonic()
            warm_up, rest = 500, 3000
            seen = [next(codes) for _ in range(warm_up)]
            before = vm_rss_kib(process.pid)
            middle = 0
            for i in range(rest):
                seen.append(next(codes))
                if i == rest // 2:
                    middle = vm_rss_kib(process.pid)
            after = vm_rss_kib(process.pid)
            elapsed = time.monotonic() - began
            ok = stub.Embed(pb.EmbedRequest(inputs=["still serving"]), timeout=10)
        assert ok.dimensions == 384
        assert process.poll() is None
        counts = {code.name: seen.count(code) for code in set(seen)}
        print(
            f"\n{len(seen)} bad requests in {elapsed:.1f}s {counts}; VmRSS after {warm_up}: "
            f"{before / 1024:.1f} MiB, after {warm_up + rest // 2}: {middle / 1024:.1f} MiB, "
            f"after {len(seen)}: {after / 1024:.1f} MiB (+{(after - before) / 1024:.1f} MiB)"
        )
        expected = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"}
        expected |= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
        assert set(counts) <= expected, counts
        assert after - before < 30 * 1024, f"VmRSS grew {(after - before) / 1024:.1f} MiB"
    finally:
        stop_sidecar(process)
