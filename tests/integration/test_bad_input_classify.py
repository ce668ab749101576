"""Bad input to Classify and to the other classifier RPCs, ExtractEntities (token
classification) and Rerank (a cross-encoder): blank fields, enum values the proto does not
define, counts out of range. The server goes on serving after each."""

from __future__ import annotations

import grpc
import pytest

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.integration.bad_input import (
    INT32_MAX,
    INT32_MIN,
    INVALID,
    collect,
    expect,
    generate,
    still_serving,
)


@pytest.mark.parametrize("blank", ["", "   ", "\n\t "])
async def test_empty_or_whitespace_input(inference: InferenceStub, blank: str) -> None:
    await expect(
        inference.Classify(pb.ClassifyRequest(model="triage", inputs=["fine", blank])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[1] is empty or whitespace-only",
    )


async def test_empty_query_passage_prompt_and_candidate_label(
    tasks: InferenceStub, inference: InferenceStub
) -> None:
    await expect(
        tasks.Rerank(pb.RerankRequest(model="ranker", query=" \n", inputs=["p"])),
        INVALID,
        "query is empty or whitespace-only: send the search query",
    )
    await expect(
        tasks.Rerank(pb.RerankRequest(model="ranker", query="q", inputs=["p", "\t"])),
        INVALID,
        "inputs[1] is empty or whitespace-only",
    )
    await expect(
        tasks.ExtractEntities(pb.ExtractEntitiesRequest(model="ner", inputs=[" "])),
        INVALID,
        "inputs[0] is empty or whitespace-only",
    )
    await expect(
        generate(tasks, pb.GenerateRequest(model="gpt2", prompt="")),
        INVALID,
        "no prompt",
    )
    await still_serving(tasks)


@pytest.mark.parametrize("value", [6, 42, -1, 2**31 - 1])
async def test_unknown_enum_value_is_refused_naming_the_field(
    tasks: InferenceStub, value: int
) -> None:
    request = pb.ExtractEntitiesRequest(model="ner", inputs=["x"], aggregation=value)  # type: ignore[arg-type]
    await expect(
        tasks.ExtractEntities(request),
        INVALID,
        f"aggregation {value} is not an AggregationStrategy value",
        "AGGREGATION_STRATEGY_MAX (5)",
        "leave it unset for SIMPLE",
    )
    answers = await collect(
        tasks.Stream(iter([pb.StreamRequest(id="e", extract_entities=request)]))
    )
    assert answers["e"][0].error.code == INVALID.value[0]
    assert "is not an AggregationStrategy value" in answers["e"][0].error.message
    await still_serving(tasks)


async def test_count_parameters(inference: InferenceStub, tasks: InferenceStub) -> None:
    for top_k in (-1, INT32_MIN):
        await expect(
            inference.Classify(pb.ClassifyRequest(model="triage", inputs=["x"], top_k=top_k)),
            INVALID,
            f"top_k must be 0 (no limit) or positive, got {top_k}",
        )
    everything = await inference.Classify(pb.ClassifyRequest(model="triage", inputs=["x"]))
    for top_k in (1, INT32_MAX):
        answer = await inference.Classify(
            pb.ClassifyRequest(model="triage", inputs=["x"], top_k=top_k)
        )
        assert len(answer.results[0].labels) == min(top_k, len(everything.results[0].labels))
    for top_n in (-1, INT32_MIN):
        await expect(
            tasks.Rerank(pb.RerankRequest(model="ranker", query="q", inputs=["p"], top_n=top_n)),
            INVALID,
            f"top_n must be 0 (no limit) or positive, got {top_n}",
        )
    ranked = await tasks.Rerank(
        pb.RerankRequest(model="ranker", query="q", inputs=["a", "b"], top_n=INT32_MAX)
    )
    assert len(ranked.results) == 2
    await expect(
        tasks.Rerank(pb.RerankRequest(model="ranker", query="q")), INVALID, "inputs is empty"
    )
    await expect(
        tasks.Rerank(pb.RerankRequest(model="ranker", query="q", inputs=["p"] * 5000)),
        INVALID,
        "5000 inputs, over max_rerank_passages 8",
    )
    await still_serving(tasks)
