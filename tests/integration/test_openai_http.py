"""The OpenAI-compatible HTTP API against a live server, through OpenAI's own SDK, curl,
Node's fetch and raw HTTP; its answers compared with the gRPC ones."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import openai
import pytest

from sidecar.config import ModelSettings
from sidecar.server import SidecarServer
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.conftest import (
    channel_to,
    decode_steps,
    local_settings,
    serving,
    settled_steps,
    text,
    token_ids,
)

ROOT = Path(__file__).resolve().parents[2]
TICKETS = ["My refund has not arrived after two weeks", "The app crashes when I upload a photo"]
# Generations the server runs at once: the overload test fills them.
SLOTS = 2


@pytest.fixture(scope="module")
async def server(
    minilm_dir: Path, gpt2_dir: Path, cross_encoder_dir: Path, smollm2_dir: Path
) -> AsyncIterator[SidecarServer]:
    settings = local_settings(
        # The names the README's curl lines use, beside the tiny models the checks compare.
        ModelSettings(path=minilm_dir, name="all-minilm-l6-v2"),
        ModelSettings(path=smollm2_dir, name="smollm2"),
        ModelSettings(path=gpt2_dir, name="gpt2"),
        ModelSettings(path=cross_encoder_dir, name="reranker"),
        http_address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
        max_concurrent_generations=SLOTS,
    )
    async with serving(settings) as running:
        yield running


@pytest.fixture(scope="module")
def base(server: SidecarServer) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
async def client(base: str) -> AsyncIterator[openai.AsyncOpenAI]:
    # No retries: a 429 or 503 must reach the test, not be retried away.
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
async def stub(server: SidecarServer) -> AsyncIterator[InferenceStub]:
    async with channel_to(server) as channel:
        yield InferenceStub(channel)


@pytest.fixture(scope="module")
async def raw(base: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        yield c


async def test_embeddings_equal_grpc_embed_as_floats_and_base64(
    client: openai.AsyncOpenAI, stub: InferenceStub
) -> None:
    expected = await stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=TICKETS))
    floats = await client.embeddings.create(model="all-minilm-l6-v2", input=TICKETS)
    packed = await client.embeddings.create(
        model="all-minilm-l6-v2", input=TICKETS, encoding_format="base64"
    )
    one = await client.embeddings.create(model="all-minilm-l6-v2", input=TICKETS[0])
    for index, embedding in enumerate(expected.embeddings):
        want = np.array(embedding.values, dtype=np.float32)
        assert floats.data[index].index == index
        np.testing.assert_array_equal(np.array(floats.data[index].embedding, np.float32), want)
        # Asked for base64, the SDK hands over the text as it came.
        vector = packed.data[index].embedding
        assert isinstance(vector, str)
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(vector), "<f4"), want)
    np.testing.assert_array_equal(
        np.array(one.data[0].embedding, np.float32), np.array(expected.embeddings[0].values)
    )
    tokens = sum(e.token_count for e in expected.embeddings)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    assert floats.model == "all-minilm-l6-v2"


async def test_base64_is_little_endian_float32(raw: httpx.AsyncClient) -> None:
    body = {"model": "all-minilm-l6-v2", "input": "hello", "encoding_format": "base64"}
    answer = (await raw.post("/v1/embeddings", json=body)).json()
    vector = np.frombuffer(base64.b64decode(answer["data"][0]["embedding"]), dtype="<f4")
    floats = (await raw.post("/v1/embeddings", json={**body, "encoding_format": "float"})).json()
    np.testing.assert_array_equal(vector, np.array(floats["data"][0]["embedding"], np.float32))
    assert vector.shape == (384,)


async def test_dimensions_only_where_the_model_gives_them(client: openai.AsyncOpenAI) -> None:
    same = await client.embeddings.create(model="all-minilm-l6-v2", input="x", dimensions=384)
    assert len(same.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as refused:
        await client.embeddings.create(model="all-minilm-l6-v2", input="x", dimensions=128)
    assert "384-dimensional" in refused.value.message
    assert refused.value.param == "dimensions"  # type: ignore[attr-defined]


async def grpc_generate(stub: InferenceStub, **fields: Any) -> list[pb.GenerateResponse]:
    return [r async for r in stub.Generate(pb.GenerateRequest(**fields), timeout=60)]


async def test_chat_completions_equal_grpc_generate_streamed_and_not(
    client: openai.AsyncOpenAI, stub: InferenceStub
) -> None:
    messages = [{"role": "system", "content": "You triage tickets."}]
    messages.append({"role": "user", "content": TICKETS[0]})
    expected = await grpc_generate(
        stub,
        model="gpt2",
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        max_new_tokens=12,
        temperature=0,
    )
    request: dict[str, Any] = {"model": "gpt2", "messages": messages, "temperature": 0}
    whole = await client.chat.completions.create(**request, max_tokens=12)
    assert whole.choices[0].message.content == text(expected)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    usage = expected[-1].usage
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert whole.id.startswith("chatcmpl-")
    assert whole.system_fingerprint == expected[-1].metadata.revision
    stream = await client.chat.completions.create(
        **request,
        max_completion_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text(expected)
    # A delta per step, as the gRPC stream sends one per step.
    assert len([d for d in deltas if d]) == len([r for r in expected if r.text])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


async def test_completions_equal_grpc_generate_and_stop_maps_to_stop(
    client: openai.AsyncOpenAI, stub: InferenceStub
) -> None:
    expected = await grpc_generate(
        stub, model="gpt2", prompt="Ticket:", max_new_tokens=10, temperature=0, seed=3
    )
    whole = await client.completions.create(
        model="gpt2", prompt="Ticket:", max_tokens=10, temperature=0, seed=3
    )
    assert whole.choices[0].text == text(expected)
    streamed = await client.completions.create(
        model="gpt2", prompt=["Ticket:"], max_tokens=10, temperature=0, stream=True
    )
    assert "".join([c.choices[0].text async for c in streamed]) == text(expected)
    # A stop sequence taken from the reply itself ends it there: finish_reason stop.
    stop = text(expected)[3:6]
    stopped = await client.completions.create(
        model="gpt2", prompt="Ticket:", max_tokens=10, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert len(token_ids(expected)) == 10


async def test_response_format_json_schema_goes_through_the_structured_engine(
    client: openai.AsyncOpenAI,
) -> None:
    schema = {
        "type": "object",
        "properties": {"priority": {"enum": ["low", "high"]}},
        "required": ["priority"],
        "additionalProperties": False,
    }
    reply = await client.chat.completions.create(
        model="gpt2",
        messages=[{"role": "user", "content": TICKETS[1]}],
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
    )
    assert json.loads(reply.choices[0].message.content or "")["priority"] in ("low", "high")
    assert reply.choices[0].finish_reason == "stop"
    anything = await client.chat.completions.create(
        model="gpt2",
        messages=[{"role": "user", "content": TICKETS[1]}],
        max_tokens=60,
        seed=1,
        response_format={"type": "json_object"},
    )
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content or ""), dict)


async def test_rerank_in_cohere_shape(raw: httpx.AsyncClient, stub: InferenceStub) -> None:
    documents = ["refunds take ten days", "photos upload from the gallery", "crash on upload"]
    expected = await stub.Rerank(
        pb.RerankRequest(model="reranker", query=TICKETS[1], inputs=documents)
    )
    answer = await raw.post(
        "/v1/rerank",
        json={
            "model": "reranker",
            "query": TICKETS[1],
            "documents": [documents[0], {"text": documents[1]}, documents[2]],
            "top_n": 2,
            "return_documents": True,
        },
    )
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["index"] for r in results] == [r.index for r in expected.results[:2]]
    for got, want in zip(results, expected.results, strict=False):
        assert got["relevance_score"] == pytest.approx(want.score, abs=1e-6)
        assert got["document"] == {"text": documents[want.index]}


async def test_models_list_the_served_models(client: openai.AsyncOpenAI) -> None:
    listed = {m.id: m for m in (await client.models.list()).data}
    assert set(listed) == {"all-minilm-l6-v2", "smollm2", "gpt2", "reranker"}
    one = await client.models.retrieve("gpt2")
    assert one.id == "gpt2"
    assert one.owned_by == "transformers-sidecar"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("gpt-4o")
    assert "gpt-4o" in missing.value.message


async def test_errors_arrive_as_the_sdk_raises_them(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await client.embeddings.create(model="nope", input="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as wrong_task:
        await client.embeddings.create(model="gpt2", input="x")
    assert wrong_task.value.code == "model_wrong_task"
    with pytest.raises(openai.BadRequestError) as several:
        await client.chat.completions.create(
            model="gpt2", messages=[{"role": "user", "content": "x"}], n=2
        )
    assert several.value.param == "n"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as tools:
        await client.chat.completions.create(
            model="gpt2",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f"}}],
        )
    assert tools.value.param == "tools"  # type: ignore[attr-defined]


# Bodies that are the caller's mistake: each gets 400 (or 413) and an OpenAI error object.
BAD_BODIES: list[tuple[str, bytes | dict[str, Any], int, str]] = [
    ("/v1/embeddings", b"{not json", 400, "not valid JSON"),
    ("/v1/embeddings", b"\xff\xfe", 400, "UTF-8"),
    ("/v1/embeddings", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/embeddings", b'{"input": NaN}', 400, "NaN"),
    ("/v1/embeddings", b"[" * 100_000, 400, "nested too deeply"),
    ("/v1/embeddings", {"model": "all-minilm-l6-v2"}, 400, "input is required"),
    ("/v1/embeddings", {"input": []}, 400, "empty list"),
    ("/v1/embeddings", {"input": [[1, 2, 3]]}, 400, "token id"),
    ("/v1/embeddings", {"input": [5]}, 400, "token id"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400, "float or base64"),
    ("/v1/embeddings", {"input": "x", "model": 5}, 400, "model must be a string"),
    ("/v1/embeddings", {"input": ["x"] * 65}, 400, "64"),
    ("/v1/embeddings", {"input": "x" * 17_000_000}, 413, "max_message_bytes"),
    ("/v1/chat/completions", {"model": "gpt2"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "gpt2", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "gpt2", "messages": [{"role": "tool"}]}, 400, "role"),
    (
        "/v1/chat/completions",
        {"model": "gpt2", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "text parts only",
    ),
    (
        "/v1/chat/completions",
        {"model": "gpt2", "messages": [{"role": "user", "content": "x"}], "temperature": -1},
        400,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        {"model": "gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"model": "gpt2", "messages": [{"role": "user", "content": "x"}], "top_p": "high"},
        400,
        "top_p must be a number",
    ),
    (
        "/v1/chat/completions",
        {"model": "gpt2", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
        400,
        "logprobs",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "gpt2",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}},
        },
        400,
        "schema",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "gpt2",
            "messages": [{"role": "user", "content": "x"}],
            "stream_options": {"include_usage": True},
        },
        400,
        "stream: true",
    ),
    ("/v1/completions", {"model": "gpt2", "prompt": ["a", "b"]}, 400, "exactly one"),
    ("/v1/completions", {"model": "gpt2", "prompt": [1, 2]}, 400, "token id"),
    ("/v1/completions", {"model": "gpt2", "prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/rerank", {"model": "reranker", "documents": ["a"]}, 400, "query"),
    ("/v1/embeddings", b'{"input": "\\ud800", "model": "\\udfff"}', 400, "surrogate"),
    ("/v1/embeddings", b'{"input": "x", "dimensions": 1' + b"0" * 5000 + b"}", 400, "number"),
    ("/v1/embeddings", {"input": "x", "model": 0}, 400, "model must be a string"),
    (
        "/v1/chat/completions",
        {"model": "gpt2", "messages": [{"role": "user", "content": "x"}], "top_p": 10**400},
        400,
        "finite",
    ),
    ("/v1/chat/completions", {"model": "gpt2", "messages": [{"role": []}]}, 400, "role"),
    ("/v1/embeddings", {"input": "x", "encoding_format": [[[[1]]]] * 3}, 400, "a list"),
    ("/v1/rerank", {"model": "reranker", "query": "q", "documents": [3]}, 400, "documents[0]"),
]


@pytest.mark.parametrize(("path", "body", "status", "words"), BAD_BODIES)
async def test_bad_input_gets_a_clear_status_and_the_server_goes_on(
    raw: httpx.AsyncClient, path: str, body: bytes | dict[str, Any], status: int, words: str
) -> None:
    if isinstance(body, dict):
        answer = await raw.post(path, json=body)
    else:
        answer = await raw.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in answer.text
    after = await raw.post("/v1/embeddings", json={"input": "still serving"})
    assert after.status_code == 200


async def test_unknown_routes_and_methods_get_openai_errors(raw: httpx.AsyncClient) -> None:
    missing = await raw.post("/v1/audio/speech", json={})
    assert missing.status_code == 404
    assert "/v1/embeddings" in missing.json()["error"]["message"]
    wrong = await raw.get("/v1/embeddings")
    assert wrong.status_code == 405
    assert "GET" in wrong.json()["error"]["message"]
    bad_timeout = await raw.post(
        "/v1/embeddings", json={"input": "x"}, headers={"x-request-timeout": "soon"}
    )
    assert bad_timeout.status_code == 400


async def test_a_deadline_from_the_timeout_header_is_504(raw: httpx.AsyncClient) -> None:
    body = {"model": "gpt2", "prompt": "x", "max_tokens": 100, "temperature": 0}
    answer = await raw.post("/v1/completions", json=body, headers={"x-request-timeout": "0.001"})
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"]["type"] == "timeout"


async def test_a_streamed_completion_keeps_its_deadline_past_the_first_chunk(
    raw: httpx.AsyncClient, server: SidecarServer
) -> None:
    # SmolLM2 takes seconds for 200 tokens here; the deadline is half a second.
    body = {"model": "smollm2", "prompt": "Once", "max_tokens": 200, "stream": True}
    began = time.monotonic()
    async with raw.stream(
        "POST", "/v1/completions", json=body, headers={"x-request-timeout": "0.5"}
    ) as response:
        assert response.status_code == 200
        events = [line async for line in response.aiter_lines() if line]
    assert time.monotonic() - began < 5
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "timeout"
    assert server.dataplane.generations.running == 0


async def test_overload_is_429_with_retry_after(
    raw: httpx.AsyncClient, client: openai.AsyncOpenAI, server: SidecarServer
) -> None:
    # Held by SmolLM2 streams nobody reads: seconds each, so the slots stay taken.
    body = {"model": "smollm2", "prompt": "Once", "max_tokens": 100, "stream": True}
    opened = []
    try:
        for _ in range(SLOTS):  # streams that hold a generation each, read no further
            stream = raw.stream("POST", "/v1/completions", json=body)
            response = await stream.__aenter__()
            assert response.status_code == 200
            opened.append(stream)
        with pytest.raises(openai.RateLimitError) as overloaded:
            await client.completions.create(model="gpt2", prompt="x", max_tokens=2)
        assert overloaded.value.response.headers["retry-after"] == "1"
        assert "max_concurrent_generations" in overloaded.value.message
    finally:
        for stream in opened:
            await stream.__aexit__(None, None, None)
    for _ in range(500):
        if server.dataplane.generations.running == 0:
            break
        await asyncio.sleep(0.01)
    assert server.dataplane.generations.running == 0


async def test_a_client_that_leaves_mid_stream_stops_its_generation(
    base: str, server: SidecarServer
) -> None:
    body = {"model": "gpt2", "prompt": "x", "max_tokens": 100, "stream": True, "temperature": 0}
    before = decode_steps(server, "gpt2")
    async with (
        httpx.AsyncClient(base_url=base, timeout=60) as own,
        own.stream("POST", "/v1/completions", json=body) as response,
    ):
        lines = response.aiter_lines()
        while not (await anext(lines)).startswith("data: {"):
            pass
    # The connection is closed: the server lets the generation go within a step.
    for _ in range(1000):
        if server.dataplane.generations.running == 0:
            break
        await asyncio.sleep(0.005)
    assert server.dataplane.generations.running == 0
    steps = await settled_steps(server, "gpt2") - before
    assert steps < 50, f"{steps} steps ran for a caller that left after the first"


async def test_metrics_count_http_calls_by_route_status_and_transport(
    server: SidecarServer, raw: httpx.AsyncClient, stub: InferenceStub
) -> None:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    ok = (
        'sidecar_requests_total{code="200",model="all-minilm-l6-v2",'
        'rpc="/v1/embeddings",transport="http"}'
    )
    missing = (
        'sidecar_requests_total{code="404",model="gone",rpc="/v1/embeddings",transport="http"}'
    )
    grpc_ok = (
        'sidecar_requests_total{code="OK",model="all-minilm-l6-v2",rpc="Embed",transport="grpc"}'
    )

    async def counts() -> list[float]:
        scraped = (await raw.get(url)).text.splitlines()
        samples = [line.rsplit(" ", 1) for line in scraped if not line.startswith("#")]
        found = {series: float(value) for series, value in samples}
        return [found.get(series, 0.0) for series in (ok, missing, grpc_ok)]

    before = await counts()
    await raw.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "counted"})
    await raw.post("/v1/embeddings", json={"model": "gone", "input": "counted"})
    await stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["counted"]))
    after = await counts()
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]


async def test_health_is_200_while_serving(raw: httpx.AsyncClient) -> None:
    answer = await raw.get("/health")
    assert (answer.status_code, answer.json()) == (200, {"status": "serving"})


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## OpenAI-compatible HTTP", 1)[1]
    return section.split("\n## ", 1)[0]


async def test_the_readme_curl_lines_run(base: str) -> None:
    commands = re.findall(r"^(curl .+)$", readme_section(), flags=re.MULTILINE)
    assert len(commands) >= 4
    for command in commands:
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command.replace("localhost:8080", base.removeprefix("http://")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, (command, stderr)
        out = stdout.decode().strip()
        if out.startswith("data:"):
            assert out.endswith("data: [DONE]"), command
        elif out.isdigit():
            assert out == "200", command
        else:
            assert "error" not in json.loads(out), (command, out)


NODE_STREAM = """
const [base] = process.argv.slice(2);
const response = await fetch(`${base}/v1/chat/completions`, {
  method: "POST",
  headers: { "content-type": "application/json" },
  body: JSON.stringify({ model: "gpt2", stream: true, max_tokens: 12, temperature: 0,
                         messages: [{ role: "user", content: "Summarize the ticket" }] }),
});
let text = "", buffered = "", done = false;
for await (const piece of response.body.pipeThrough(new TextDecoderStream())) {
  buffered += piece;
  let end;
  while ((end = buffered.indexOf("\\n\\n")) >= 0) {
    const event = buffered.slice(0, end).replace(/^data: /, "");
    buffered = buffered.slice(end + 2);
    if (event === "[DONE]") { done = true; continue; }
    text += JSON.parse(event).choices[0]?.delta?.content ?? "";
  }
}
console.log(JSON.stringify({ status: response.status, done, text }));
"""


async def test_node_fetch_reads_a_streamed_chat_completion(
    base: str, client: openai.AsyncOpenAI, tmp_path: Path
) -> None:
    script = tmp_path / "stream.mjs"
    script.write_text(NODE_STREAM)
    process = await asyncio.create_subprocess_exec(
        "node", str(script), base, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    seen = json.loads(out)
    expected = await client.chat.completions.create(
        model="gpt2",
        messages=[{"role": "user", "content": "Summarize the ticket"}],
        max_tokens=12,
        temperature=0,
    )
    assert seen == {"status": 200, "done": True, "text": expected.choices[0].message.content}


async def test_a_token_guards_every_route_but_health(minilm_dir: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-with-enough-characters\n")
    settings = local_settings(
        ModelSettings(path=minilm_dir, name="minilm"),
        http_address="127.0.0.1:0",
        auth_token_file=str(token),
    )
    async with serving(settings) as guarded:
        url = f"http://127.0.0.1:{guarded.http_port}/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as refused:
                await wrong.embeddings.create(model="minilm", input="x")
            assert "does not match" in refused.value.message
        key = "s3cret-token-with-enough-characters"
        async with openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0) as right:
            assert len((await right.embeddings.create(model="minilm", input="x")).data) == 1
        async with httpx.AsyncClient() as anyone:
            health = await anyone.get(f"http://127.0.0.1:{guarded.http_port}/health")
            assert health.status_code == 200
            bare = await anyone.get(f"{url}/models")
            assert bare.status_code == 401
            assert bare.headers["www-authenticate"] == "Bearer"


async def test_draining_answers_503_and_lets_a_stream_finish(smollm2_dir: Path) -> None:
    # A real model, so that the stream is still running when the drain begins.
    settings = local_settings(
        ModelSettings(path=smollm2_dir, name="smollm2"),
        http_address="127.0.0.1:0",
        grace_period_s=30,
    )
    server = await SidecarServer.start(settings)
    base = f"http://127.0.0.1:{server.http_port}"
    body = {"model": "smollm2", "prompt": "Once", "max_tokens": 60, "stream": True}
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("data: {")
            stopping = asyncio.ensure_future(server.stop())
            await asyncio.sleep(0.2)
            async with httpx.AsyncClient(base_url=base, timeout=10) as other:
                health = await other.get("/health")
                refused = await other.post("/v1/completions", json={**body, "stream": False})
            rest = [line async for line in lines if line]
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] in ("stop", "length"), last
        began = time.monotonic()
        await stopping
        assert time.monotonic() - began < 10


async def test_a_held_http_port_fails_the_start_naming_the_address(
    minilm_dir: Path, server: SidecarServer
) -> None:
    from sidecar.errors import ConfigError

    taken = f"127.0.0.1:{server.http_port}"
    with pytest.raises(ConfigError, match=re.escape(taken)):
        await SidecarServer.start(
            local_settings(ModelSettings(path=minilm_dir), http_address=taken)
        )
