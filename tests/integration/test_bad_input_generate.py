"""Bad input to Generate on the `tasks` server's GPT-2 (a 128-token context): a megabyte
prompt, generation parameters out of range, extreme values that are still valid, and response
formats that are invalid, unsupported or over their limits."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.integration.bad_input import (
    INT32_MAX,
    INT32_MIN,
    INVALID,
    ONE_MB,
    expect,
    generate,
    still_serving,
)

UINT64_MAX = 2**64 - 1
NAN, INF = float("nan"), float("inf")


async def test_one_megabyte_prompt_is_cut_or_refused(tasks: InferenceStub) -> None:
    steps = await generate(tasks, pb.GenerateRequest(model="gpt2", prompt=ONE_MB, max_new_tokens=2))
    assert steps[-1].usage.truncated_prompt_tokens > 100_000
    await expect(
        generate(
            tasks, pb.GenerateRequest(model="gpt2", prompt=ONE_MB, max_new_tokens=2, truncate=False)
        ),
        INVALID,
        "over the 126 tokens the model's context of 128 leaves beside max_new_tokens 2",
        "set truncate to cut it",
    )
    await still_serving(tasks)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be 0 (the default) or more, got -1"),
        (
            {"max_new_tokens": INT32_MIN},
            f"max_new_tokens must be 0 (the default) or more, got {INT32_MIN}",
        ),
        (
            {"max_new_tokens": INT32_MAX, "truncate": False},
            f"max_new_tokens {INT32_MAX} leaves no room",
        ),
        ({"temperature": -0.5}, "temperature must be 0 (greedy) or more, got -0.5"),
        ({"temperature": NAN}, "temperature must be a finite number, got nan"),
        ({"temperature": INF}, "temperature must be a finite number, got inf"),
        ({"top_k": -1}, "top_k must be 0 (no limit) or more, got -1"),
        ({"top_k": INT32_MIN}, "top_k must be 0 (no limit) or more"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": -1.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": NAN}, "top_p must be a finite number, got nan"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be above 0 (1 = off), got 0.0"),
        ({"repetition_penalty": -2.0}, "repetition_penalty must be above 0"),
        ({"repetition_penalty": -INF}, "repetition_penalty must be a finite number, got -inf"),
        ({"stop": ["x"] * 17}, "17 stop sequences; at most 16 are allowed"),
        ({"stop": ["x" * 257]}, "stop[0] must be 1 to 256 characters, got 257"),
        ({"stop": [""]}, "stop[0] must be 1 to 256 characters, got 0"),
    ],
)
async def test_out_of_range_generation_parameters(
    tasks: InferenceStub, fields: dict[str, Any], fragment: str
) -> None:
    await expect(
        generate(tasks, pb.GenerateRequest(model="gpt2", prompt="hello", **fields)),
        INVALID,
        fragment,
    )
    await still_serving(tasks)


@pytest.mark.parametrize(
    "fields",
    [
        {"max_new_tokens": 0},  # the model's default
        {"max_new_tokens": INT32_MAX},  # ends when the context is full
        {"temperature": 0.0},
        {"temperature": -0.0},
        {"temperature": 3.4e38},
        {"temperature": 1e-45},
        {"top_k": 0},
        {"top_k": INT32_MAX, "temperature": 1.0},
        {"top_p": 1e-45, "temperature": 1.0},
        {"top_p": 1.0, "temperature": 1.0},
        {"repetition_penalty": 3.4e38},
        {"repetition_penalty": 1e-45, "temperature": 1.0},
        {"seed": 0, "temperature": 1.0},
        {"seed": UINT64_MAX, "temperature": 1.0},
    ],
)
async def test_extreme_but_valid_generation_parameters_generate(
    tasks: InferenceStub, fields: dict[str, Any]
) -> None:
    fields = {"max_new_tokens": 3, **fields}
    steps = await generate(tasks, pb.GenerateRequest(model="gpt2", prompt="hello", **fields))
    last = steps[-1]
    assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert last.usage.prompt_tokens + last.usage.completion_tokens <= 128


@pytest.mark.parametrize(
    ("fmt", "fragment"),
    [
        (pb.ResponseFormat(), "response_format is set but empty"),
        (pb.ResponseFormat(json_schema="{"), "response_format.json_schema is not valid JSON"),
        (pb.ResponseFormat(json_schema="true"), "must be a JSON object (a schema), got bool"),
        (
            pb.ResponseFormat(json_schema='{"type": "array", "uniqueItems": true}'),
            'Unimplemented keys: ["uniqueItems"]',
        ),
        (
            pb.ResponseFormat(json_schema='{"type": "string", "pattern": "(["}'),
            "unclosed character class",
        ),
        (
            pb.ResponseFormat(json_schema='{"enum": ["' + "x" * 70_000 + '"]}'),
            "bytes; at most 65536",
        ),
        (pb.ResponseFormat(regex="(ab"), "response_format.regex is not valid"),
        (pb.ResponseFormat(regex="x" * 5000), "regex is 5000 characters; at most 4096"),
        (pb.ResponseFormat(choice=pb.Choices()), "response_format.choice has 0 values"),
        (pb.ResponseFormat(lark_grammar="start: x"), 'unknown name: "x"'),
    ],
)
async def test_bad_response_formats(
    tasks: InferenceStub, fmt: pb.ResponseFormat, fragment: str
) -> None:
    await expect(
        generate(tasks, pb.GenerateRequest(model="gpt2", prompt="hello", response_format=fmt)),
        INVALID,
        fragment,
    )
    await still_serving(tasks)
