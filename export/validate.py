"""Validation: the exported dir, run through the sidecar's own tokenizer and ONNX backend,
against the PyTorch model with transformers' tokenizer, on several input shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from export import validate_generation
from export.checkpoint import CheckpointInfo
from sidecar.errors import ValidationError
from sidecar.models.manifest import Task
from sidecar.runtime.onnx import OnnxBackend
from sidecar.tasks import embed
from sidecar.tasks.tokenization import EncodedBatch, TextEncoder

# What `validation` in the manifest compared.
ONNX_VS_PYTORCH = "onnx-vs-pytorch"
TOKENIZER_ONLY = "tokenizer-only"
SHORT = "Refund not received after 14 days."
MIXED = [
    "My invoice is wrong.",
    "The app crashes whenever I upload a photo larger than 10 MB; please advise, it's urgent!",
    "Café déjà vu — naïve façade, 東京 and emoji 🚀 all in one ticket.",
    "ok",
]


# Pair tasks: which text of a pair truncation shortens, as the sidecar encodes them. A reranker
# keeps the query whole and cuts the passage; zero-shot keeps the hypothesis ("This example is
# {label}.") whole and cuts the premise.
PAIR_TRUNCATION = {Task.RERANK: "only_second", Task.ZERO_SHOT: "only_first"}


def cases(max_length: int) -> list[list[str]]:
    """Batches of different shapes: one short input, a padded mix, and over-long inputs."""
    long_text = _long(max_length)
    return [[SHORT], MIXED, [long_text, long_text[: len(long_text) // 3]]]


def _long(max_length: int) -> str:
    return " ".join(["The customer reports the export fails on large reports."] * max_length)


def pair_case(task: Task, max_length: int) -> list[tuple[str, str]]:
    """One padded batch of (text, text) pairs, one of them over-long on its truncated side."""
    if task is Task.RERANK:
        return [
            ("How do I reset my password?", "Open settings, then security, then reset."),
            ("refund not received", _long(max_length)),
            (SHORT, MIXED[2]),
        ]
    return [
        (SHORT, "This example is billing."),
        (_long(max_length), "This example is a bug."),
        (MIXED[2], "This example is about travel."),
    ]


def _torch_outputs(
    model: Any, tokenizer: Any, texts: list[str], max_length: int
) -> tuple[Any, Any]:
    import torch

    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.inference_mode():
        output = model(**batch)
    return batch, output


def encode_pairs(encoder: TextEncoder, pairs: list[tuple[str, str]], task: Task) -> EncodedBatch:
    """Pairs encoded and padded by the sidecar's own serving code for the task."""
    keep = "first" if task is Task.RERANK else "second"
    return encoder.pad(encoder.encode_pairs(pairs, truncate=True, keep=keep))


def _checked_pairs(
    exported: Path, encoder: TextEncoder, tokenizer: Any, info: CheckpointInfo
) -> tuple[Any, EncodedBatch, list[tuple[str, str]]]:
    """transformers' encoding of pair_case() and the sidecar's; ValidationError if ids differ."""
    strategy = PAIR_TRUNCATION[info.task]
    pairs = pair_case(info.task, info.max_length)
    reference = tokenizer(
        [a for a, _ in pairs],
        [b for _, b in pairs],
        padding=True,
        truncation=strategy,
        max_length=info.max_length,
        return_tensors="pt",
    )
    batch = encode_pairs(encoder, pairs, info.task)
    # Segment ids matter for pairs: BERT-style models tell query from passage by them.
    same = np.array_equal(reference["input_ids"].numpy(), batch.input_ids) and (
        "token_type_ids" not in reference
        or np.array_equal(reference["token_type_ids"].numpy(), batch.token_type_ids)
    )
    if not same:
        raise ValidationError(
            f"the exported tokenizer gives other ids than the checkpoint's tokenizer for the pair "
            f"({pairs[0][0][:40]!r}, {pairs[0][1][:40]!r})...: the model would see different "
            "text than it was trained on"
        )
    return reference, batch, pairs


def validate(
    source: Path,
    exported: Path,
    info: CheckpointInfo,
    atol: float,
    trust_remote_code: bool,
    onnx: bool = True,
) -> dict[str, Any]:
    """Check the exported dir against the checkpoint; raise ValidationError on a difference."""
    if not onnx:
        return tokenizer_only(source, exported, info, atol, trust_remote_code)
    if info.task.generative:
        return {
            "compared": ONNX_VS_PYTORCH,
            **validate_generation.validate(source, exported, info, atol, trust_remote_code),
        }
    return {
        "compared": ONNX_VS_PYTORCH,
        **_encoder(source, exported, info, atol, trust_remote_code),
    }


def tokenizer_only(
    source: Path, exported: Path, info: CheckpointInfo, atol: float, trust_remote_code: bool
) -> dict[str, Any]:
    """For a dir without ONNX: the torch backend runs the checkpoint's own weights, so only
    the sidecar's tokenizer can differ from the checkpoint's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if info.task.generative:
        limit, texts = (
            validate_generation.prompt_limit(info),
            validate_generation.prompts(info.max_length),
        )
    else:
        limit, texts = info.max_length, [text for batch in cases(info.max_length) for text in batch]
    encoder = TextEncoder(exported, limit)
    lengths = [len(validate_generation.checked_ids(encoder, tokenizer, t, limit)) for t in texts]
    cases_ = [{"batch": 1, "seq_len": n, "tokenizer": "same ids"} for n in lengths]
    if info.task in PAIR_TRUNCATION:
        _, batch, pairs = _checked_pairs(exported, encoder, tokenizer, info)
        cases_.append(
            {
                "batch": len(pairs),
                "seq_len": int(batch.input_ids.shape[1]),
                "pairs": PAIR_TRUNCATION[info.task],
                "tokenizer": "same ids",
            }
        )
    return {
        "compared": TOKENIZER_ONLY,
        # Nothing numeric was compared: the weights served are the checkpoint's own.
        "atol": atol,
        "max_abs_diff": 0.0,
        "cases": cases_,
    }


def _encoder(
    source: Path, exported: Path, info: CheckpointInfo, atol: float, trust_remote_code: bool
) -> dict[str, Any]:
    """Compare outputs case by case; raise ValidationError above atol or on a tokenizer mismatch."""
    from transformers import (
        AutoModel,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    model_class: Any = AutoModelForSequenceClassification
    if info.task is Task.EMBED:
        model_class = AutoModel
    elif info.task is Task.EXTRACT_ENTITIES:
        model_class = AutoModelForTokenClassification
    model = model_class.from_pretrained(source, trust_remote_code=trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    encoder = TextEncoder(exported, info.max_length)
    backend = OnnxBackend(exported / "model.onnx", "cpu")

    results: list[dict[str, Any]] = []
    worst = 0.0
    for texts in cases(info.max_length):
        reference_batch, reference = _torch_outputs(model, tokenizer, texts, info.max_length)
        batch = encoder.encode(texts, truncate=True)
        if not np.array_equal(reference_batch["input_ids"].numpy(), batch.input_ids):
            raise ValidationError(
                f"the exported tokenizer gives other ids than the checkpoint's tokenizer for "
                f"{texts[0][:40]!r}...: the model would see different text than it was trained on"
            )
        diff = _compare(backend, batch, reference, info, atol)
        worst = max(worst, diff)
        results.append(
            {"batch": len(texts), "seq_len": int(batch.input_ids.shape[1]), "max_abs_diff": diff}
        )
    if info.task in PAIR_TRUNCATION:
        import torch

        reference_batch, batch, pairs = _checked_pairs(exported, encoder, tokenizer, info)
        with torch.inference_mode():
            reference = model(**reference_batch)
        diff = _compare(backend, batch, reference, info, atol)
        worst = max(worst, diff)
        results.append(
            {
                "batch": len(pairs),
                "seq_len": int(batch.input_ids.shape[1]),
                "pairs": PAIR_TRUNCATION[info.task],
                "max_abs_diff": diff,
            }
        )
    return {"atol": atol, "max_abs_diff": worst, "cases": results}


def _compare(
    backend: OnnxBackend, batch: EncodedBatch, reference: Any, info: CheckpointInfo, atol: float
) -> float:
    """Largest |ONNX - PyTorch| on what callers can see; ValidationError above atol."""
    outputs = backend.run(batch.feed())
    mask = batch.attention_mask
    if info.task is Task.EMBED:
        assert info.pooling is not None
        hidden, expected = outputs["last_hidden_state"], reference.last_hidden_state.numpy()
        mode = info.pooling.mode
        errors = [
            # Real tokens only (padded positions never reach a caller), then the pooled vector.
            np.where(mask[..., None] > 0, hidden - expected, 0),
            embed.pool(hidden, mask, mode) - embed.pool(expected, mask, mode),
        ]
    elif info.task is Task.EXTRACT_ENTITIES:
        # Per-token logits: real tokens only, as for embeddings.
        errors = [np.where(mask[..., None] > 0, outputs["logits"] - reference.logits.numpy(), 0)]
    else:
        errors = [outputs["logits"] - reference.logits.numpy()]
    # np.max propagates NaN, and `not diff <= atol` is true for NaN: a NaN always fails.
    diff = float(np.max([np.max(np.abs(e)) for e in errors]))
    if not diff <= atol:
        raise ValidationError(
            f"ONNX outputs differ from PyTorch by {diff:.2e} (atol {atol:.0e}) on a batch of "
            f"{batch.input_ids.shape[0]} x {batch.input_ids.shape[1]} tokens: the export is not "
            "faithful"
        )
    return diff
