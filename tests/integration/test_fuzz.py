"""Property-based fuzzing of a live `sidecar serve`: random requests on every RPC.

Hypothesis builds requests from random unicode (every code point UTF-8 can carry: control
characters, zero-width and private-use ones, astral planes), very long strings, extreme
and non-finite numbers, random lists and model names, raw bytes, and Stream item sequences
with repeated ids and cancels. For every call:

- it ends within its deadline (a DEADLINE_EXCEEDED here is a hang: every call is quick);
- it never answers INTERNAL or UNKNOWN, and any other failure is one of the documented
  client codes (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED) with
  a message;
- the server process is still running afterwards.

Examples are derandomized (the same ones on every run) and few, so the file stays fast
and CI stable. A failure prints the falsifying request and the server log's tail.
"""

from __future__ import annotations

import math
import operator
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc, models_pb2, models_pb2_grpc
from tests.processes import free_port, start_sidecar, stop_sidecar, wait_serving

pytestmark = pytest.mark.slow

T = TypeVar("T")
CALL_TIMEOUT_S = 20.0
CLIENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
MODELS = ["minilm", "triage", "gpt2", "ner", "ranker", "nli"]
INT32_MIN, INT32_MAX, UINT64_MAX = -(2**31), 2**31 - 1, 2**64 - 1

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# ---------------------------------------------------------------- the server


@dataclass
class Target:
    """The sidecar under test, a channel to it, and its log."""

    process: subprocess.Popen[bytes]
    channel: grpc.Channel
    inference: inference_pb2_grpc.InferenceStub
    models: models_pb2_grpc.ModelsStub
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def target(
    minilm_dir: Path,
    classifier_dir: Path,
    gpt2_dir: Path,
    token_classifier_dir: Path,
    cross_encoder_dir: Path,
    nli_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Target]:
    dirs = [minilm_dir, classifier_dir, gpt2_dir, token_classifier_dir, cross_encoder_dir, nli_dir]
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    process = start_sidecar(
        log,
        *(
            arg
            for name, path in zip(MODELS, dirs, strict=True)
            for arg in ("--model", f"{name}={path}")
        ),
        *("--address", address, "--metrics-address", "", "--log-level", "WARNING"),
        *("--max-client-batch-size", "8", "--max-message-bytes", str(256 * 1024)),
        *("--stream-max-in-flight", "4", "--max-rerank-passages", "8"),
        *("--intra-op-threads", "1"),
        env={**os.environ, "SIDECAR_GRACE_PERIOD_S": "1"},
    )
    try:
        wait_serving(address, process)
        with grpc.insecure_channel(address) as channel:
            yield Target(
                process,
                channel,
                inference_pb2_grpc.InferenceStub(channel),
                models_pb2_grpc.ModelsStub(channel),
                log,
            )
    finally:
        stop_sidecar(process)


def answered(target: Target, call: Callable[[], T], request: object) -> T | None:
    """The call's answer, or None when it failed as the properties allow."""
    try:
        result = call()
    except grpc.RpcError as err:
        code, details = err.code(), err.details()  # type: ignore[attr-defined]
        event(f"{code.name}: {(details or '')[:50]}")
        judge(target, code, details, request)
        return None
    else:
        event("OK")
        return result
    finally:
        assert target.process.poll() is None, f"the server exited:\n{target.log_tail()}"


def judge(target: Target, code: grpc.StatusCode, details: str, request: object) -> None:
    """A failed call (or Stream item) is a documented client code with a message."""
    shown = repr(request)[:600]
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, (
        f"no answer within {CALL_TIMEOUT_S}s (a hang?) for {shown}\n{target.log_tail()}"
    )
    assert code in CLIENT_CODES, (
        f"{code.name} {details!r} for {shown}\nserver log:\n{target.log_tail()}"
    )
    assert details, f"{code.name} without a message for {shown}"


# ---------------------------------------------------------------- strategies

# Every code point but the surrogates: what UTF-8, hence a proto3 string, can carry.
CHARS = st.characters(exclude_categories=("Cs",))
SPECIAL_TEXTS = [
    "",
    " ",
    "\t\n\r",
    "\x00",
    "\x00\x01\x1b[31m",
    "\u200b",
    "\ufeff",
    "\u3000",
    "\u202e reversed",
    "😀👍🏽",
    "\U0010ffff",
    "{}",
    "{0} {{}}",
    "<|endoftext|>",
    "[CLS] [SEP] [PAD] [UNK] [MASK]",
    "##ing",
    "Café 東京 naïve",
    "a" * 513,
]


def mostly(good: st.SearchStrategy[T], bad: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Seven draws in eight from `good`: most requests get past validation to the model.
    (one_of alone would not do: Hypothesis favours the small, simple branches.)"""
    return st.sampled_from(range(8)).flatmap(lambda pick: bad if pick == 7 else good)


texts = mostly(
    st.text(CHARS, min_size=1, max_size=24).filter(lambda t: not t.isspace()),
    st.one_of(
        st.sampled_from(SPECIAL_TEXTS),
        # Very long: a short piece repeated, up to 40,000 characters (about 160 kB at most).
        st.builds(operator.mul, st.text(CHARS, min_size=1, max_size=4), st.integers(64, 10_000)),
    ),
)
text_lists = mostly(
    st.lists(texts, min_size=1, max_size=4),
    st.one_of(st.just([]), st.lists(texts, min_size=8, max_size=10)),
)
int32s = st.one_of(
    st.sampled_from([0, 1, -1, INT32_MAX, INT32_MIN]),
    st.integers(INT32_MIN, INT32_MAX),
)
counts = mostly(st.integers(0, 4), int32s)  # top_k, top_n: 0 = all
float32s = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, math.nan, math.inf, -math.inf, 1e-45, 3.4e38, -3.4e38]),
    st.floats(width=32),
)
bools = st.booleans()


def model_names(*right: str) -> st.SearchStrategy[str]:
    """Mostly a model that does the task; sometimes another, the default, or junk."""
    return mostly(
        st.sampled_from(right),
        st.one_of(st.sampled_from(["", *MODELS]), st.text(CHARS, max_size=12)),
    )


def optional(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    return st.none() | strategy


def message(kind: type[T], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[T]:
    """A protobuf message; a field drawn as None stays unset."""
    return st.fixed_dictionaries(fields).map(
        lambda drawn: kind(**{k: v for k, v in drawn.items() if v is not None})
    )


embed_requests = message(
    pb.EmbedRequest,
    model=model_names("minilm"),
    inputs=text_lists,
    normalize=optional(bools),
    truncate=optional(bools),
)
fixed_label_requests = message(
    pb.ClassifyRequest,
    model=model_names("triage"),
    inputs=text_lists,
    top_k=counts,
    truncate=optional(bools),
    # Zero-shot fields are refused by a fixed-label model: mostly left out.
    candidate_labels=mostly(st.just([]), st.lists(texts, max_size=2)),
    multi_label=mostly(st.none(), bools),
)
zero_shot_requests = message(
    pb.ClassifyRequest,
    model=model_names("nli"),
    inputs=text_lists,
    top_k=counts,
    truncate=optional(bools),
    candidate_labels=mostly(
        st.lists(texts, min_size=1, max_size=4),
        st.one_of(st.just([]), st.lists(st.text(CHARS, max_size=3), min_size=60, max_size=70)),
    ),
    hypothesis_template=mostly(
        st.sampled_from(["", "This is {}.", "{}", "{0}", "Es geht um {} 😀", "{{{}}}"]),
        st.one_of(
            st.sampled_from(["{} {}", "{:>99}", "{0.real}", "{!r}", "{label}", "no field", "{"]),
            texts,
        ),
    ),
    multi_label=optional(bools),
)
classify_requests = st.one_of(fixed_label_requests, zero_shot_requests)
entities_requests = message(
    pb.ExtractEntitiesRequest,
    model=model_names("ner"),
    inputs=text_lists,
    aggregation=mostly(st.integers(0, 5), int32s),
    truncate=optional(bools),
)
rerank_requests = message(
    pb.RerankRequest,
    model=model_names("ranker"),
    query=texts,
    inputs=mostly(
        st.lists(texts, min_size=1, max_size=4),
        st.one_of(st.just([]), st.lists(texts, min_size=8, max_size=12)),
    ),
    top_n=counts,
    return_text=bools,
    truncate=optional(bools),
)
tokenize_requests = message(
    pb.TokenizeRequest,
    model=model_names(*MODELS),
    inputs=text_lists,
    add_special_tokens=optional(bools),
    truncate=optional(bools),
)
chat_messages = st.lists(
    st.builds(
        pb.ChatMessage,
        role=mostly(st.sampled_from(["system", "user", "assistant"]), st.text(CHARS, max_size=8)),
        content=texts,
    ),
    min_size=1,
    max_size=3,
)
# Either a prompt or chat messages, and now and then both or neither.
prompts = mostly(
    st.one_of(
        st.fixed_dictionaries({"prompt": texts}),
        st.fixed_dictionaries({"messages": chat_messages}),
    ),
    st.one_of(st.just({}), st.fixed_dictionaries({"prompt": texts, "messages": chat_messages})),
)
generate_parameters = message(
    dict,  # type: ignore[arg-type]
    model=model_names("gpt2"),
    # Mostly short replies; extremes too (the tiny model's 128-token context bounds them).
    max_new_tokens=mostly(st.integers(0, 6), int32s),
    temperature=optional(mostly(st.floats(0, 2), float32s)),
    top_k=optional(counts),
    top_p=optional(mostly(st.floats(0.01, 1), float32s)),
    repetition_penalty=optional(mostly(st.floats(0.5, 2), float32s)),
    stop=mostly(
        st.lists(texts, max_size=3),
        st.one_of(st.just([""]), st.lists(st.just("x"), min_size=17, max_size=17)),
    ),
    seed=optional(st.integers(0, UINT64_MAX)),
    truncate=optional(bools),
)
generate_requests = st.builds(
    lambda text, parameters: pb.GenerateRequest(**text, **parameters),
    prompts,
    generate_parameters,
)


# ---------------------------------------------------------------- unary RPCs


@FUZZ
@given(request=embed_requests)
def test_embed(target: Target, request: pb.EmbedRequest) -> None:
    answer = answered(
        target, lambda: target.inference.Embed(request, timeout=CALL_TIMEOUT_S), request
    )
    if answer is not None:
        assert len(answer.embeddings) == len(request.inputs)
        assert all(len(e.values) == answer.dimensions for e in answer.embeddings)


@FUZZ
@given(request=classify_requests)
def test_classify(target: Target, request: pb.ClassifyRequest) -> None:
    answer = answered(
        target, lambda: target.inference.Classify(request, timeout=CALL_TIMEOUT_S), request
    )
    if answer is not None:
        assert len(answer.results) == len(request.inputs)
        for result in answer.results:
            assert all(0.0 <= label.score <= 1.0 for label in result.labels)


@FUZZ
@given(request=entities_requests)
def test_extract_entities(target: Target, request: pb.ExtractEntitiesRequest) -> None:
    answer = answered(
        target, lambda: target.inference.ExtractEntities(request, timeout=CALL_TIMEOUT_S), request
    )
    if answer is not None:
        assert len(answer.results) == len(request.inputs)
        for text, result in zip(request.inputs, answer.results, strict=True):
            for entity in result.entities:
                assert 0 <= entity.span.start <= entity.span.end <= len(text)
                assert entity.text == text[entity.span.start : entity.span.end]


@FUZZ
@given(request=rerank_requests)
def test_rerank(target: Target, request: pb.RerankRequest) -> None:
    answer = answered(
        target, lambda: target.inference.Rerank(request, timeout=CALL_TIMEOUT_S), request
    )
    if answer is not None:
        kept = (
            len(request.inputs) if request.top_n == 0 else min(request.top_n, len(request.inputs))
        )
        assert len(answer.results) == kept
        assert sorted({r.index for r in answer.results}) == sorted(r.index for r in answer.results)


@FUZZ
@given(request=tokenize_requests)
def test_tokenize(target: Target, request: pb.TokenizeRequest) -> None:
    answer = answered(
        target, lambda: target.inference.Tokenize(request, timeout=CALL_TIMEOUT_S), request
    )
    if answer is not None:
        assert len(answer.results) == len(request.inputs)
        for result in answer.results:
            assert len(result.ids) == len(result.tokens) == result.token_count


@FUZZ
@given(request=generate_requests)
def test_generate(target: Target, request: pb.GenerateRequest) -> None:
    steps = answered(
        target, lambda: list(target.inference.Generate(request, timeout=CALL_TIMEOUT_S)), request
    )
    if steps:
        last = steps[-1]
        assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert all(s.finish_reason == pb.FINISH_REASON_UNSPECIFIED for s in steps[:-1])
        assert last.usage.completion_tokens == sum(len(s.token_ids) for s in steps)


@FUZZ
@given(name=st.one_of(st.sampled_from(["", *MODELS]), st.text(CHARS, max_size=40)))
def test_get_model(target: Target, name: str) -> None:
    request = models_pb2.GetModelRequest(model=name)
    answer = answered(
        target, lambda: target.models.GetModel(request, timeout=CALL_TIMEOUT_S), request
    )
    if answer is not None:
        assert answer.model.name in MODELS


# ---------------------------------------------------------------- Stream

cheap_generate = message(
    pb.GenerateRequest,
    model=model_names("gpt2"),
    prompt=texts,
    max_new_tokens=mostly(st.integers(1, 6), st.integers(-1, 0)),
    temperature=optional(float32s),
    seed=optional(st.integers(0, UINT64_MAX)),
)
stream_items = st.builds(
    lambda item_id, payload: pb.StreamRequest(id=item_id, **payload),
    st.one_of(st.sampled_from(["a", "b", "c", ""]), st.text(CHARS, max_size=6)),
    st.one_of(
        st.builds(lambda r: {"embed": r}, embed_requests),
        st.builds(lambda r: {"classify": r}, classify_requests),
        st.builds(lambda r: {"extract_entities": r}, entities_requests),
        st.builds(lambda r: {"rerank": r}, rerank_requests),
        st.builds(lambda r: {"tokenize": r}, tokenize_requests),
        st.builds(lambda r: {"generate": r}, cheap_generate),
        st.just({"cancel": pb.CancelRequest()}),
        st.just({"cancel": pb.CancelRequest()}),
        st.just({}),  # no request
    ),
)


@FUZZ
@given(items=st.lists(stream_items, min_size=1, max_size=8))
def test_stream(target: Target, items: list[pb.StreamRequest]) -> None:
    answers = answered(
        target, lambda: list(target.inference.Stream(iter(items), timeout=CALL_TIMEOUT_S)), items
    )
    if answers is None:
        return  # a documented refusal of the whole stream (an id reused while in flight)
    finals = 0
    for answer in answers:
        kind = answer.WhichOneof("response")
        if kind == "error":
            code = CODE_BY_NUMBER[answer.error.code]
            if code != grpc.StatusCode.CANCELLED:
                judge(target, code, answer.error.message, items)
            finals += 1
        elif kind != "generate" or answer.generate.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            finals += 1
    # Every item but the cancels gets exactly one final answer, even when it was cancelled.
    assert finals == sum(item.WhichOneof("request") != "cancel" for item in items), answers


# ---------------------------------------------------------------- raw bytes

raw_messages = st.one_of(
    st.binary(max_size=64),
    # A string field (1 or 2) holding bytes that are often not UTF-8.
    st.builds(
        lambda field, payload: bytes([field << 3 | 2, len(payload)]) + payload,
        st.sampled_from([1, 2]),
        st.binary(max_size=40),
    ),
)


@FUZZ
@given(raws=st.lists(raw_messages, min_size=1, max_size=4))
def test_stream_of_raw_bytes(target: Target, raws: list[bytes]) -> None:
    call = target.channel.stream_stream("/sidecar.v1.Inference/Stream", lambda b: b, lambda b: b)
    answers = answered(target, lambda: list(call(iter(raws), timeout=CALL_TIMEOUT_S)), raws)
    for raw in answers or []:
        answer = pb.StreamResponse.FromString(raw)
        if answer.WhichOneof("response") == "error":
            code = CODE_BY_NUMBER[answer.error.code]
            if code != grpc.StatusCode.CANCELLED:
                judge(target, code, answer.error.message, raws)


@settings(FUZZ, max_examples=25)
@given(
    method=st.sampled_from(
        [
            "/sidecar.v1.Inference/Embed",
            "/sidecar.v1.Inference/Rerank",
            "/sidecar.v1.Models/GetModel",
        ]
    ),
    raw=raw_messages,
)
def test_unary_raw_bytes(target: Target, method: str, raw: bytes) -> None:
    call = target.channel.unary_unary(method, lambda b: b, lambda b: b)
    answered(target, lambda: call(raw, timeout=CALL_TIMEOUT_S), (method, raw))
