"""Entity extraction on tokenizers that mark no word pieces (byte-level BPE, Unigram) and on
BIOES labels: the sidecar's tokenizer and aggregation against the token-classification
pipeline on the same PyTorch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForTokenClassification, pipeline

from sidecar.tasks import entities
from sidecar.tasks.tokenization import TextEncoder
from tests.checkpoints import build_roberta_token_classifier, build_token_classifier

TEXTS = [
    "None of x=None; f(None) said Mary in Paris.",
    "Mary Smith met John Doe in Paris.",
    "Hello😀world from Zürich qqq",
    "x=None, y=None and z=None.",
    "ok",
]
BIOES = {0: "O", 1: "B-PER", 2: "I-PER", 3: "E-PER", 4: "S-PER", 5: "S-LOC"}


@pytest.fixture(scope="module", params=["roberta-bpe", "xlmr-unigram", "bert-bioes"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ner") / request.param
    if request.param == "bert-bioes":
        return build_token_classifier(out, labels=BIOES)
    return build_roberta_token_classifier(out, "bpe" if "bpe" in request.param else "unigram")


# The pipeline warns that it uses its word heuristic for these tokenizers: so does the sidecar.
@pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")
@pytest.mark.parametrize("strategy", entities.STRATEGIES)
def test_entities_equal_the_pipeline(checkpoint: Path, strategy: str) -> None:
    model = AutoModelForTokenClassification.from_pretrained(checkpoint).eval()
    labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    reference = pipeline(
        "token-classification", model=str(checkpoint), aggregation_strategy=strategy, device="cpu"
    )
    encoder = TextEncoder(checkpoint, 60)
    found_any = False
    encoded = encoder.encode_each(TEXTS, truncate=True, with_offsets=True)
    for text, item in zip(TEXTS, encoded, strict=True):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([item.ids.tolist()])).logits[0].numpy()
        ours = entities.extract(
            text,
            entities.softmax(logits.astype(np.float32)),
            item,
            labels,
            strategy,
            encoder.continuing_subword_prefix,
            encoder.unk_id,
        )
        key = "entity" if strategy == "none" else "entity_group"
        theirs = reference(text)
        assert [(e.label, e.start, e.end) for e in ours] == [
            (e[key], e["start"], e["end"]) for e in theirs
        ], text
        np.testing.assert_allclose([e.score for e in ours], [e["score"] for e in theirs], atol=1e-5)
        found_any = found_any or bool(ours)
    assert found_any
    # The unknown token is the tokenizer's own, as transformers reads it.
    assert encoder.unk_id == reference.tokenizer.unk_token_id
