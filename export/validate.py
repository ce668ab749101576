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
from sidecar.tasks.tokenization import TextEncoder

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


def cases(max_length: int) -> list[list[str]]:
    """Batches of different shapes: one short input, a padded mix, and over-long inputs."""
    long_text = " ".join(["The customer reports the export fails on large reports."] * max_length)
    return [[SHORT], MIXED, [long_text, long_text[: len(long_text) // 3]]]


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
    return {
        "compared": TOKENIZER_ONLY,
        # Nothing numeric was compared: the weights served are the checkpoint's own.
        "atol": atol,
        "max_abs_diff": 0.0,
        "cases": [{"batch": 1, "seq_len": n, "tokenizer": "same ids"} for n in lengths],
    }


def _encoder(
    source: Path, exported: Path, info: CheckpointInfo, atol: float, trust_remote_code: bool
) -> dict[str, Any]:
    """Compare outputs case by case; raise ValidationError above atol or on a tokenizer mismatch."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    model_class = AutoModel if info.task is Task.EMBED else AutoModelForSequenceClassification
    model = model_class.from_pretrained(source, trust_remote_code=trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    encoder = TextEncoder(exported, info.max_length)
    backend = OnnxBackend(exported / "model.onnx", "cpu")

    results = []
    worst = 0.0
    for texts in cases(info.max_length):
        reference_batch, reference = _torch_outputs(model, tokenizer, texts, info.max_length)
        batch = encoder.encode(texts, truncate=True)
        if not np.array_equal(reference_batch["input_ids"].numpy(), batch.input_ids):
            raise ValidationError(
                f"the exported tokenizer gives other ids than the checkpoint's tokenizer for "
                f"{texts[0][:40]!r}...: the model would see different text than it was trained on"
            )
        outputs = backend.run(batch.feed())
        if info.task is Task.EMBED:
            assert info.pooling is not None
            hidden, expected = outputs["last_hidden_state"], reference.last_hidden_state.numpy()
            mask = batch.attention_mask
            mode = info.pooling.mode
            errors = [
                # Real tokens only (padded positions never reach a caller), then the pooled vector.
                np.where(mask[..., None] > 0, hidden - expected, 0),
                embed.pool(hidden, mask, mode) - embed.pool(expected, mask, mode),
            ]
        else:
            errors = [outputs["logits"] - reference.logits.numpy()]
        # np.max propagates NaN, and `not diff <= atol` is true for NaN: a NaN always fails.
        diff = float(np.max([np.max(np.abs(e)) for e in errors]))
        if not diff <= atol:
            raise ValidationError(
                f"ONNX outputs differ from PyTorch by {diff:.2e} (atol {atol:.0e}) on a batch of "
                f"{len(texts)} x {batch.input_ids.shape[1]} tokens: the export is not faithful"
            )
        worst = max(worst, diff)
        results.append(
            {"batch": len(texts), "seq_len": int(batch.input_ids.shape[1]), "max_abs_diff": diff}
        )
    return {"atol": atol, "max_abs_diff": worst, "cases": results}
