"""ExtractEntities, Rerank and zero-shot Classify over gRPC, against transformers' pipelines
on the PyTorch model, on both backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from sidecar.config import ModelSettings, Settings
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.conftest import channel_to, serving

TEXTS = [
    "I was charged twice for my subscription this month.",
    "Refund request: order 1234 never arrived at the Café in Paris.",
    "Please close my account and delete my data, naïve façade.",
    "ok",
]
STRATEGIES = {
    "none": pb.AGGREGATION_STRATEGY_NONE,
    "simple": pb.AGGREGATION_STRATEGY_SIMPLE,
    "first": pb.AGGREGATION_STRATEGY_FIRST,
    "average": pb.AGGREGATION_STRATEGY_AVERAGE,
    "max": pb.AGGREGATION_STRATEGY_MAX,
}


@pytest.fixture(scope="module")
async def tasks_channel(
    token_classifier_dir: Path, cross_encoder_dir: Path, nli_dir: Path, classifier_dir: Path
) -> AsyncIterator[grpc.aio.Channel]:
    models = []
    for backend in ("onnx", "torch"):
        models += [
            ModelSettings(path=token_classifier_dir, name=f"ner-{backend}", backend=backend),
            ModelSettings(path=cross_encoder_dir, name=f"rerank-{backend}", backend=backend),
            ModelSettings(path=nli_dir, name=f"nli-{backend}", backend=backend),
        ]
    settings = Settings(
        address="127.0.0.1:0",
        http_address="",
        metrics_address="127.0.0.1:0",
        models=(*models, ModelSettings(path=classifier_dir, name="triage")),
        max_rerank_passages=8,
        intra_op_threads=1,
    )
    async with serving(settings) as server, channel_to(server) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(tasks_channel: grpc.aio.Channel) -> InferenceStub:
    return InferenceStub(tasks_channel)


BACKENDS = ["onnx", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
async def test_entities_equal_the_token_classification_pipeline(
    stub: InferenceStub, token_classifier_source: Path, backend: str, strategy: str
) -> None:
    reference = pipeline(
        "token-classification",
        model=str(token_classifier_source),
        aggregation_strategy=strategy,
        device="cpu",
    )
    reply = await stub.ExtractEntities(
        pb.ExtractEntitiesRequest(
            model=f"ner-{backend}", inputs=TEXTS, aggregation=STRATEGIES[strategy]
        )
    )
    for text, found in zip(TEXTS, reply.results, strict=True):
        expected = reference(text)
        key = "entity" if strategy == "none" else "entity_group"
        assert [(e[key], e["start"], e["end"]) for e in expected] == [
            (e.label, e.span.start, e.span.end) for e in found.entities
        ]
        np.testing.assert_allclose(
            [e.score for e in found.entities], [e["score"] for e in expected], atol=1e-4
        )
        assert all(e.text == text[e.span.start : e.span.end] for e in found.entities)
    assert any(r.entities for r in reply.results)  # the random model does find some


def reference_rerank(source: Path, query: str, passages: list[str]) -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    batch = tokenizer(
        [query] * len(passages),
        passages,
        padding=True,
        truncation="only_second",
        return_tensors="pt",
    )
    with torch.inference_mode():
        return model(**batch).logits[:, 0].numpy()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_rerank_equals_the_cross_encoder(
    stub: InferenceStub, cross_encoder_source: Path, backend: str
) -> None:
    query = "how do I get a refund"
    passages = [*TEXTS, " ".join(["refund policy details"] * 40)]  # the last is cut
    raw = reference_rerank(cross_encoder_source, query, passages)
    reply = await stub.Rerank(
        pb.RerankRequest(
            model=f"rerank-{backend}", query=query, inputs=passages, top_n=3, return_text=True
        )
    )
    order = np.argsort(-raw, kind="stable")[:3]
    assert [r.index for r in reply.results] == order.tolist()
    for result in reply.results:
        assert result.raw_score == pytest.approx(raw[result.index], abs=1e-4)
        assert result.score == pytest.approx(1 / (1 + np.exp(-raw[result.index])), abs=1e-4)
        assert result.text == passages[result.index]
        assert result.truncated == (result.index == len(passages) - 1)
    everything = await stub.Rerank(
        pb.RerankRequest(model=f"rerank-{backend}", query=query, inputs=passages)
    )
    assert len(everything.results) == len(passages)
    assert all(not r.text for r in everything.results)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("multi_label", [False, True])
async def test_zero_shot_equals_the_zero_shot_pipeline(
    stub: InferenceStub, nli_source: Path, backend: str, multi_label: bool
) -> None:
    labels = ["billing", "bug report", "account"]
    template = "The ticket is about {}."
    reference = pipeline("zero-shot-classification", model=str(nli_source), device="cpu")
    reply = await stub.Classify(
        pb.ClassifyRequest(
            model=f"nli-{backend}",
            inputs=TEXTS,
            candidate_labels=labels,
            hypothesis_template=template,
            multi_label=multi_label,
        )
    )
    assert reply.multi_label == multi_label
    for text, result in zip(TEXTS, reply.results, strict=True):
        expected = reference(
            text, candidate_labels=labels, hypothesis_template=template, multi_label=multi_label
        )
        got = {s.label: s.score for s in result.labels}
        want = dict(zip(expected["labels"], expected["scores"], strict=True))
        assert got.keys() == want.keys()
        for label in labels:
            assert got[label] == pytest.approx(want[label], abs=1e-4)
        assert [s.score for s in result.labels] == sorted(got.values(), reverse=True)
        assert [labels[s.id] for s in result.labels] == [s.label for s in result.labels]


async def expect_invalid(call: Any, *fragments: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    for fragment in fragments:
        assert fragment in caught.value.details()


async def test_bad_inputs_are_invalid_argument(stub: InferenceStub) -> None:
    await expect_invalid(
        stub.Classify(pb.ClassifyRequest(model="nli-onnx", inputs=["x"])), "candidate_labels"
    )
    await expect_invalid(
        stub.Classify(
            pb.ClassifyRequest(model="nli-onnx", inputs=["x"], candidate_labels=["a", "a"])
        ),
        "duplicates",
    )
    # No {}, a width that would build huge strings, attribute and index access, two fields.
    for template in ("no", "{:>100000000}", "{0.real}", "{0[x]}", "{} and {}", "{label}"):
        await expect_invalid(
            stub.Classify(
                pb.ClassifyRequest(
                    model="nli-onnx",
                    inputs=["x"],
                    candidate_labels=["a"],
                    hypothesis_template=template,
                )
            ),
            "must hold exactly one {}",
        )
    for fixed in (
        pb.ClassifyRequest(model="triage", inputs=["x"], candidate_labels=["a"]),
        pb.ClassifyRequest(model="triage", inputs=["x"], hypothesis_template="It is {}."),
        pb.ClassifyRequest(model="triage", inputs=["x"], multi_label=True),
    ):
        await expect_invalid(stub.Classify(fixed), "fixed labels")
    long_query = " ".join(["refund"] * 200)
    await expect_invalid(
        stub.Rerank(pb.RerankRequest(model="rerank-onnx", query=long_query, inputs=["p"])),
        "leaves no room for the passage",
    )
    await expect_invalid(
        stub.Rerank(pb.RerankRequest(model="rerank-onnx", query="q")), "inputs is empty"
    )
    await expect_invalid(
        stub.Rerank(pb.RerankRequest(model="rerank-onnx", query="q", inputs=["p"] * 9)),
        "9 inputs, over max_rerank_passages 8",
    )
    await expect_invalid(
        stub.Rerank(pb.RerankRequest(model="rerank-onnx", query="  ", inputs=["p"])), "query"
    )
    await expect_invalid(
        stub.Rerank(pb.RerankRequest(model="rerank-onnx", query="q", inputs=["p"], top_n=-1)),
        "top_n",
    )
    await expect_invalid(
        stub.ExtractEntities(
            pb.ExtractEntitiesRequest(model="ner-onnx", inputs=["x"], aggregation=42)  # type: ignore[arg-type]
        ),
        "aggregation",
    )
    await expect_invalid(
        stub.ExtractEntities(pb.ExtractEntitiesRequest(model="ner-onnx", inputs=[" "])),
        "inputs[0] is empty",
    )
    # And the server goes on.
    ok = await stub.Rerank(pb.RerankRequest(model="rerank-onnx", query="q", inputs=["p"]))
    assert len(ok.results) == 1


async def test_stream_items_and_concurrent_calls_share_batches(stub: InferenceStub) -> None:
    items = [
        pb.StreamRequest(
            id="ner", extract_entities=pb.ExtractEntitiesRequest(model="ner-onnx", inputs=TEXTS)
        ),
        pb.StreamRequest(
            id="rank", rerank=pb.RerankRequest(model="rerank-onnx", query="q", inputs=TEXTS)
        ),
    ]
    answers = {r.id: r async for r in stub.Stream(iter(items))}
    solo_ner = await stub.ExtractEntities(pb.ExtractEntitiesRequest(model="ner-onnx", inputs=TEXTS))
    assert answers["ner"].extract_entities.results == solo_ner.results
    solo_rank = await stub.Rerank(pb.RerankRequest(model="rerank-onnx", query="q", inputs=TEXTS))
    assert [r.index for r in answers["rank"].rerank.results] == [r.index for r in solo_rank.results]
    calls = await asyncio.gather(
        *(
            stub.Rerank(pb.RerankRequest(model="rerank-onnx", query="q", inputs=[text]))
            for text in TEXTS * 4
        )
    )
    by_text = {r.index: r.raw_score for r in solo_rank.results}
    for text, call in zip(TEXTS * 4, calls, strict=True):
        assert call.results[0].raw_score == pytest.approx(by_text[TEXTS.index(text)], abs=1e-5)
    assert max(c.metadata.batch_size for c in calls) > 1


async def test_models_report_their_tasks(tasks_channel: grpc.aio.Channel) -> None:
    from sidecar.v1 import common_pb2, models_pb2
    from sidecar.v1.models_pb2_grpc import ModelsStub

    listed = await ModelsStub(tasks_channel).ListModels(models_pb2.ListModelsRequest())
    tasks = {m.name: m.task for m in listed.models}
    assert tasks["ner-onnx"] == common_pb2.TASK_EXTRACT_ENTITIES
    assert tasks["rerank-torch"] == common_pb2.TASK_RERANK
    assert tasks["nli-onnx"] == common_pb2.TASK_ZERO_SHOT
    assert tasks["triage"] == common_pb2.TASK_CLASSIFY
