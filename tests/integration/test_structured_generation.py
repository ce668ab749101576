"""Generate with a response format, over gRPC, on tiny random decoders whose free output is
noise: replies validate against many generated JSON schemas (jsonschema), match their regex
or are one of their choices; greedy replies equal transformers' generate() under the same
library's mask, on both backends; constrained and free generations that share decode steps
get what each gets alone; cancel and deadline stop them; bad formats are INVALID_ARGUMENT,
on Generate and on Stream, and the server goes on."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import llguidance
import llguidance.hf
import llguidance.numpy
import llguidance.torch
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from sidecar.config import ModelSettings, Settings
from sidecar.generation.formats import JSON_OPTIONS
from sidecar.server import SidecarServer
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.checkpoints import build_gpt2
from tests.conftest import (
    channel_to,
    export_quietly,
    serving,
    settled_steps,
    steps_after_release,
    text,
    token_ids,
)

PROMPT = "Triage: I was charged twice for order 1234."
ENDED = (pb.FINISH_REASON_COMPLETE, pb.FINISH_REASON_EOS)
TRIAGE = {
    "type": "object",
    "properties": {
        "category": {"enum": ["billing", "login", "bug"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 16},
        "ticket": {"type": "string", "pattern": "^T-[0-9]{3}$"},
    },
    "required": ["category", "priority", "summary"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def wide_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with a 1024-token context: room for long constrained replies."""
    return build_gpt2(tmp_path_factory.mktemp("ckpt") / "wide", context=1024, seed=3)


@pytest.fixture(scope="module")
async def server(
    wide_source: Path, bart_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SidecarServer]:
    wide = export_quietly(wide_source, tmp_path_factory.mktemp("models") / "wide", backend="both")
    settings = Settings(
        address="127.0.0.1:0",
        http_address="",
        metrics_address="127.0.0.1:0",
        models=(
            ModelSettings(path=wide, name="gpt2"),
            ModelSettings(path=wide, name="gpt2-torch", backend="torch"),
            ModelSettings(path=bart_dir, name="bart"),
        ),
        intra_op_threads=1,
    )
    async with serving(settings) as running:
        yield running


@pytest.fixture(scope="module")
async def stub(server: SidecarServer) -> AsyncIterator[InferenceStub]:
    async with channel_to(server) as channel:
        yield InferenceStub(channel)


def json_schema(schema: object) -> pb.ResponseFormat:
    return pb.ResponseFormat(json_schema=json.dumps(schema))


async def generate(stub: InferenceStub, **fields: Any) -> list[pb.GenerateResponse]:
    fields.setdefault("model", "gpt2")
    fields.setdefault("prompt", PROMPT)
    timeout = fields.pop("timeout", 60)
    call = stub.Generate(pb.GenerateRequest(**fields), timeout=timeout)
    return [r async for r in call]


# Schemas whose replies are bounded (strings, arrays and numbers' ranges), so a random model
# always finishes one within the context.
WORDS = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF), max_size=8)
LEAVES = st.one_of(
    st.builds(
        lambda low, span: {"type": "integer", "minimum": low, "maximum": low + span},
        st.integers(-1000, 1000),
        st.integers(0, 5000),
    ),
    st.builds(
        lambda low, span: {"type": "number", "minimum": low, "maximum": low + span},
        st.integers(-100, 100),
        st.integers(1, 1000),
    ),
    st.builds(
        lambda least, more: {"type": "string", "minLength": least, "maxLength": least + more},
        st.integers(0, 3),
        st.integers(0, 6),
    ),
    st.sampled_from(["^[a-z]{1,6}$", "^T-[0-9]{3}$", "^(yes|no)$", "^[A-F0-9]{4}$"]).map(
        lambda pattern: {"type": "string", "pattern": pattern}
    ),
    st.lists(
        st.one_of(WORDS, st.integers(-50, 50), st.booleans(), st.none()),
        min_size=1,
        max_size=4,
        unique_by=json.dumps,
    ).map(lambda values: {"enum": values}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
)


def _object(properties: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.lists(st.sampled_from(sorted(properties)), unique=True).map(
        lambda required: {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        }
    )


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.builds(
            lambda items, least, more: {
                "type": "array",
                "items": items,
                "minItems": least,
                "maxItems": least + more,
            },
            children,
            st.integers(0, 1),
            st.integers(0, 3),
        ),
        st.dictionaries(
            st.from_regex(r"[a-z_]{1,8}", fullmatch=True), children, min_size=1, max_size=4
        ).flatmap(_object),
    )


SCHEMAS = st.recursive(LEAVES, _containers, max_leaves=8)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schema=SCHEMAS, seed=st.integers(0, 2**32 - 1))
async def test_replies_validate_against_generated_schemas(
    stub: InferenceStub, schema: dict[str, Any], seed: int
) -> None:
    responses = await generate(
        stub,
        response_format=json_schema(schema),
        max_new_tokens=900,
        temperature=1.0,
        seed=seed,
    )
    reply = text(responses)
    assert responses[-1].finish_reason in ENDED, reply
    jsonschema.validate(json.loads(reply), schema)


@pytest.mark.parametrize(
    "pattern",
    [
        r"[A-Z]{2}-[0-9]{4}",
        r"(low|medium|high)",
        r"[0-9]{1,3}(\.[0-9]{1,2})?",
        r"[a-z]+@[a-z]{2,8}\.(com|org)",
    ],
)
async def test_replies_match_their_regex(stub: InferenceStub, pattern: str) -> None:
    for seed in range(4):
        responses = await generate(
            stub,
            response_format=pb.ResponseFormat(regex=pattern),
            max_new_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        assert responses[-1].finish_reason in ENDED
        assert re.fullmatch(pattern, text(responses)), text(responses)


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    choices=st.lists(WORDS.filter(bool), min_size=1, max_size=5, unique=True),
    seed=st.integers(0, 2**32 - 1),
)
async def test_replies_are_one_of_their_choices(
    stub: InferenceStub, choices: list[str], seed: int
) -> None:
    responses = await generate(
        stub,
        response_format=pb.ResponseFormat(choice=pb.Choices(values=choices)),
        temperature=1.0,
        seed=seed,
    )
    assert text(responses) in choices


async def test_json_object_and_lark_grammar_replies(stub: InferenceStub) -> None:
    ended = 0
    for seed in range(3):
        responses = await generate(
            stub,
            response_format=pb.ResponseFormat(json_object=pb.JsonObject()),
            max_new_tokens=900,
            temperature=1.0,
            seed=seed,
        )
        # Any keys, any values: a random model may run to the limit, but what ends parses.
        if responses[-1].finish_reason in ENDED:
            ended += 1
            assert isinstance(json.loads(text(responses)), dict)
    assert ended
    grammar = 'start: "ticket " ID " is " STATE\nID: /[0-9]{1,4}/\nSTATE: "open" | "closed"'
    for seed in range(3):
        responses = await generate(
            stub,
            response_format=pb.ResponseFormat(lark_grammar=grammar),
            temperature=1.0,
            seed=seed,
        )
        assert responses[-1].finish_reason == pb.FINISH_REASON_COMPLETE
        assert re.fullmatch(r"ticket [0-9]{1,4} is (open|closed)", text(responses))


class LibraryMask:
    """llguidance's own mask as a transformers logits processor: its tokenizer reader, its
    matcher, its torch kernel. Nothing of the sidecar's but the JSON options."""

    def __init__(self, source: Path, grammar: str, prompt_tokens: int) -> None:
        tokenizer = llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(source))
        self._matcher = llguidance.LLMatcher(tokenizer, grammar)
        self._bits = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
        self._prompt = prompt_tokens
        self._consumed = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = input_ids[0, self._prompt :].tolist()
        for token in chosen[self._consumed :]:
            assert self._matcher.consume_token(token), self._matcher.get_error()
        self._consumed = len(chosen)
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bits)
        llguidance.torch.apply_token_bitmask_inplace(scores, torch.from_numpy(self._bits))
        return scores


@pytest.mark.parametrize("model", ["gpt2", "gpt2-torch"])
@pytest.mark.parametrize(
    "fmt",
    [
        json_schema(TRIAGE),
        pb.ResponseFormat(regex=r"[a-z ]{3,30}\."),
        pb.ResponseFormat(choice=pb.Choices(values=["billing", "login", "bug", "other"])),
    ],
    ids=["json_schema", "regex", "choice"],
)
async def test_greedy_replies_equal_transformers_under_the_same_mask(
    stub: InferenceStub, wide_source: Path, model: str, fmt: pb.ResponseFormat
) -> None:
    reference = AutoModelForCausalLM.from_pretrained(wide_source).eval()
    tokenizer = AutoTokenizer.from_pretrained(wide_source)
    kind = fmt.WhichOneof("format")
    if kind == "json_schema":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            fmt.json_schema, overrides=JSON_OPTIONS
        )
    elif kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(fmt.regex)
    else:
        grammar = llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(v) for v in fmt.choice.values)
        )
    for prompt in [PROMPT, "The app crashes when I open the settings page."]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            expected = reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=120,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
                logits_processor=LogitsProcessorList(
                    [LibraryMask(wide_source, grammar, ids.shape[1])]
                ),
            )[0, ids.shape[1] :].tolist()
        responses = await generate(
            stub, model=model, prompt=prompt, response_format=fmt, max_new_tokens=120
        )
        got = token_ids(responses)
        if responses[-1].finish_reason == pb.FINISH_REASON_COMPLETE:
            # Complete: the sidecar ends at once; transformers spends a step on the only token
            # the mask leaves, EOS.
            assert expected == [*got, tokenizer.eos_token_id]
        else:
            assert got == expected
        assert responses[-1].finish_reason in ENDED


async def test_a_seq2seq_reply_follows_its_format(stub: InferenceStub) -> None:
    for seed in range(3):
        responses = await generate(
            stub,
            model="bart",
            response_format=pb.ResponseFormat(regex=r"(yes|no), [0-9]{2}"),
            max_new_tokens=12,
            temperature=1.0,
            seed=seed,
        )
        assert responses[-1].finish_reason in ENDED
        assert re.fullmatch(r"(yes|no), [0-9]{2}", text(responses))


async def test_constrained_and_free_generations_sharing_steps_get_what_each_gets_alone(
    stub: InferenceStub,
) -> None:
    requests = [
        {"response_format": json_schema(TRIAGE)},
        {"prompt": "hello there", "max_new_tokens": 40},
        {"response_format": pb.ResponseFormat(regex=r"[a-z]{5,40}")},
        {"prompt": "The app crashes", "max_new_tokens": 40},
        {"response_format": pb.ResponseFormat(choice=pb.Choices(values=["yes", "no"]))},
    ]
    alone = [token_ids(await generate(stub, **r)) for r in requests]
    together = await asyncio.gather(*(generate(stub, **r) for r in requests))
    assert [token_ids(r) for r in together] == alone
    assert max(r[-1].metadata.batch_size for r in together) > 1


LONG = pb.ResponseFormat(regex="[a-z]{1000}")


async def test_a_cancel_stops_a_constrained_generation_within_a_step(
    stub: InferenceStub, server: SidecarServer
) -> None:
    start = await settled_steps(server, "gpt2")
    call = stub.Generate(
        pb.GenerateRequest(model="gpt2", prompt="hi", response_format=LONG, max_new_tokens=1000)
    )
    received = 0
    async for _ in call:
        received += 1
        if received == 5:
            break
    call.cancel()
    at_release, done = await steps_after_release(server, "gpt2")
    assert done - at_release <= 1
    assert done - start < 1000


async def test_a_deadline_stops_a_constrained_generation(
    stub: InferenceStub, server: SidecarServer
) -> None:
    start = await settled_steps(server, "gpt2")
    # Short enough that even an idle machine cannot finish the reply first (the regex takes
    # a few hundred steps of multi-letter tokens: under 0.3 s when nothing else runs).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, prompt="hi", response_format=LONG, max_new_tokens=1000, timeout=0.05)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await settled_steps(server, "gpt2") - start < 1000
    assert server.dataplane.generations.running == 0


async def test_bad_formats_are_refused_on_stream_items_and_the_stream_goes_on(
    stub: InferenceStub,
) -> None:
    async def requests() -> AsyncIterator[pb.StreamRequest]:
        yield pb.StreamRequest(
            id="bad",
            generate=pb.GenerateRequest(
                model="gpt2", prompt="hi", response_format=pb.ResponseFormat(regex="(ab")
            ),
        )
        yield pb.StreamRequest(
            id="good",
            generate=pb.GenerateRequest(
                model="gpt2",
                prompt="hi",
                response_format=pb.ResponseFormat(choice=pb.Choices(values=["yes", "no"])),
            ),
        )

    answers: dict[str, list[pb.StreamResponse]] = {}
    async for response in stub.Stream(requests(), timeout=60):
        answers.setdefault(response.id, []).append(response)
    (bad,) = answers["bad"]
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "unclosed group" in bad.error.message
    good = answers["good"]
    assert "".join(r.generate.text for r in good) in ("yes", "no")
    assert good[-1].generate.finish_reason == pb.FINISH_REASON_COMPLETE
