"""Embed over gRPC against sentence-transformers on the same checkpoint."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub

LONG = " ".join(
    ["The customer says the nightly export of invoices to the accounting system fails silently."]
    * 30
)
SENTENCES = [
    "Refund not received after 14 days.",
    "How do I reset my password?",
    "The app crashes when I upload a photo.",
    "I was charged twice for the same order!!!",
    "Please cancel my subscription, effective immediately.",
    "Login fails with error 500 since yesterday's update.",
    "Where can I download last month's invoice (PDF)?",
    "Great service, thanks a lot :)",
    "¿Dónde está mi pedido? Lo compré hace dos semanas.",
    "Mon colis est arrivé endommagé — que faire ?",
    "Die Rechnung enthält einen Fehler bei der Mehrwertsteuer.",
    "東京の配送センターから荷物が届きません。",
    "Доставка задерживается уже неделю.",
    "emoji test 🚀🔥👍 and symbols ©®™ § ¶",
    "    leading and trailing whitespace    ",
    "ALL CAPS URGENT TICKET: SERVER DOWN",
    "a",
    "Tabs\tand\nnewlines\nin\tone input",
    "C'est l'été; naïve façade, coöperate, résumé.",
    "SELECT * FROM users WHERE id = 1; -- not an injection, just text",
    LONG,
    LONG + " And one more sentence at the very end that must be cut.",
]


@pytest.fixture(scope="module")
def reference(minilm_source: Path) -> np.ndarray:
    """sentence-transformers' own embeddings of SENTENCES (normalized)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_source), device="cpu")
    return model.encode(SENTENCES, normalize_embeddings=True)


async def test_embeddings_match_sentence_transformers(
    inference: InferenceStub, reference: np.ndarray
) -> None:
    response = await inference.Embed(pb.EmbedRequest(model="minilm", inputs=SENTENCES))
    got = np.array([e.values for e in response.embeddings], dtype=np.float32)
    assert got.shape == reference.shape == (len(SENTENCES), 384)
    cosines = (got * reference).sum(axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosines.min() >= 0.9999, cosines
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


async def test_truncation_is_reported_per_input(inference: InferenceStub) -> None:
    response = await inference.Embed(pb.EmbedRequest(inputs=["short text", LONG]))
    short, long = response.embeddings
    assert (short.truncated, short.token_count) == (False, 4)
    assert (long.truncated, long.token_count) == (True, 256)
    assert response.dimensions == 384


async def test_truncate_off_rejects_overlong_input_with_index_and_count(
    inference: InferenceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await inference.Embed(pb.EmbedRequest(inputs=["fine", LONG], truncate=False))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1]" in caught.value.details()
    assert "over the model's limit of 256" in caught.value.details()
    assert "truncate=true" in caught.value.details()


async def test_normalize_off_matches_unnormalized_reference(
    inference: InferenceStub, minilm_source: Path
) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize

    model = SentenceTransformer(str(minilm_source), device="cpu")
    # Drop the checkpoint's Normalize module to get its raw pooled vectors.
    raw = SentenceTransformer(
        modules=[m for m in model if not isinstance(m, Normalize)], device="cpu"
    )
    expected = raw.encode(SENTENCES[:3])
    response = await inference.Embed(pb.EmbedRequest(inputs=SENTENCES[:3], normalize=False))
    got = np.array([e.values for e in response.embeddings])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


async def test_same_text_same_vector_whatever_the_batch(inference: InferenceStub) -> None:
    alone = await inference.Embed(pb.EmbedRequest(inputs=[SENTENCES[0]]))
    batched = await inference.Embed(pb.EmbedRequest(inputs=[LONG, SENTENCES[0], "x"]))
    np.testing.assert_allclose(alone.embeddings[0].values, batched.embeddings[1].values, atol=1e-5)


async def test_metadata_names_model_backend_and_timings(
    inference: InferenceStub, minilm_dir: Path
) -> None:
    import hashlib

    response = await inference.Embed(pb.EmbedRequest(inputs=["one", "two"]))
    meta = response.metadata
    digest = hashlib.sha256((minilm_dir / "manifest.json").read_bytes()).hexdigest()
    assert (meta.model, meta.revision, meta.backend, meta.device) == (
        "minilm",
        f"sha256:{digest}",
        "onnx",
        "cpu",
    )
    assert meta.batch_size == 2
    assert meta.inference_us > 0
    assert meta.tokenize_us > 0
