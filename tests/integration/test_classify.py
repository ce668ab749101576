"""Classify over gRPC against the PyTorch model's probabilities."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.checkpoints import LABELS

TICKETS = [
    "I was charged twice this month.",
    "The app crashes on the settings page, please help!",
    "Reset my password",
    "Café naïve façade 🚀",
    "order 1234 " * 40,  # longer than the model's 64 tokens: truncated
]


def torch_probabilities(source: Path, texts: list[str], multi_label: bool) -> np.ndarray:
    """The checkpoint's probabilities computed by transformers on PyTorch."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits
    return (logits.sigmoid() if multi_label else logits.softmax(-1)).numpy()


def by_id(result: pb.Classification) -> np.ndarray:
    scores = np.zeros(len(LABELS))
    for label in result.labels:
        scores[label.id] = label.score
    return scores


async def test_probabilities_match_pytorch(
    inference: InferenceStub, classifier_source: Path
) -> None:
    expected = torch_probabilities(classifier_source, TICKETS, multi_label=False)
    response = await inference.Classify(pb.ClassifyRequest(model="triage", inputs=TICKETS))
    got = np.array([by_id(r) for r in response.results])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert response.multi_label is False
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert [r.truncated for r in response.results] == [False, False, False, False, True]


async def test_multi_label_uses_sigmoid(inference: InferenceStub, multilabel_source: Path) -> None:
    expected = torch_probabilities(multilabel_source, TICKETS, multi_label=True)
    response = await inference.Classify(pb.ClassifyRequest(model="moderation", inputs=TICKETS))
    got = np.array([by_id(r) for r in response.results])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert response.multi_label is True


async def test_labels_sorted_with_names_from_id2label(inference: InferenceStub) -> None:
    response = await inference.Classify(pb.ClassifyRequest(model="triage", inputs=TICKETS[:1]))
    labels = response.results[0].labels
    assert sorted(label.label for label in labels) == sorted(LABELS.values())
    assert [label.score for label in labels] == sorted(
        (label.score for label in labels), reverse=True
    )
    assert all(LABELS[label.id] == label.label for label in labels)


async def test_top_k_keeps_the_best(inference: InferenceStub) -> None:
    full = await inference.Classify(pb.ClassifyRequest(model="triage", inputs=TICKETS[:2]))
    top = await inference.Classify(pb.ClassifyRequest(model="triage", inputs=TICKETS[:2], top_k=1))
    for whole, best in zip(full.results, top.results, strict=True):
        assert len(best.labels) == 1
        assert best.labels[0].label == whole.labels[0].label
    many = await inference.Classify(
        pb.ClassifyRequest(model="triage", inputs=TICKETS[:1], top_k=99)
    )
    assert len(many.results[0].labels) == len(LABELS)


async def test_negative_top_k_is_invalid(inference: InferenceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await inference.Classify(pb.ClassifyRequest(model="triage", inputs=["x"], top_k=-1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_k must be 0 (no limit) or positive, got -1" in caught.value.details()
