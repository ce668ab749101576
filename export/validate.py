"""Validation: the exported dir, run through the sidecar's own tokenizer and ONNX backend,
against the PyTorch model with transformers' tokenizer, on several input shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from export import validate_generation
from export.checkpoint import CheckpointInfo
from export.compare import Tolerance, closeness, refusal
from export.errors import ValidationError
from export.validate_generation import long_text
from sidecar.models.manifest import ONNX_VS_PYTORCH, TOKENIZER_ONLY, Task
from sidecar.runtime.onnx import OnnxBackend
from sidecar.tasks import embed
from sidecar.tasks.tokenization import EncodedBatch, TextEncoder

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
    text = long_text(max_length)
    return [[SHORT], MIXED, [text, text[: len(text) // 3]]]


def pair_case(task: Task, max_length: int) -> list[tuple[str, str]]:
    """One padded batch of (text, text) pairs, one of them over-long on its truncated side."""
    if task is Task.RERANK:
        return [
            ("How do I reset my password?", "Open settings, then security, then reset."),
            ("refund not received", long_text(max_length)),
            (SHORT, MIXED[2]),
        ]
    return [
        (SHORT, "This example is billing."),
        (long_text(max_length), "This example is a bug."),
        (MIXED[2], "This example is about travel."),
    ]


def _forward(model: Any, batch: Any) -> Any:
    """The PyTorch model on the tokenizer's outputs that its forward takes: a tokenizer may
    emit token_type_ids a model has no use for (ModernBERT saved with a BERT tokenizer)."""
    import inspect

    import torch

    accepted = inspect.signature(model.forward).parameters
    with torch.inference_mode():
        return model(**{k: v for k, v in batch.items() if k in accepted})


def encode_pairs(encoder: TextEncoder, pairs: list[tuple[str, str]], task: Task) -> EncodedBatch:
    """Pairs encoded and padded by the sidecar's own serving code for the task."""
    keep = "first" if task is Task.RERANK else "second"
    return encoder.pad(encoder.encode_pairs(pairs, truncate=True, keep=keep))


def _checked_pairs(
    encoder: TextEncoder, tokenizer: Any, task: Task, pairs: list[tuple[str, str]]
) -> tuple[Any, EncodedBatch]:
    """transformers' encoding of pairs and the sidecar's; ValidationError if ids differ."""
    reference = tokenizer(
        [a for a, _ in pairs],
        [b for _, b in pairs],
        padding=True,
        truncation=PAIR_TRUNCATION[task],
        max_length=encoder.max_length,
        return_tensors="pt",
    )
    batch = encode_pairs(encoder, pairs, task)
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
    return reference, batch


def _checked_texts(
    encoder: TextEncoder, tokenizer: Any, texts: list[str]
) -> tuple[Any, EncodedBatch]:
    """transformers' padded encoding of texts and the sidecar's; ValidationError if ids differ."""
    reference = tokenizer(
        texts, padding=True, truncation=True, max_length=encoder.max_length, return_tensors="pt"
    )
    batch = encoder.encode(texts, truncate=True)
    if not np.array_equal(reference["input_ids"].numpy(), batch.input_ids):
        raise ValidationError(
            f"the exported tokenizer gives other ids than the checkpoint's tokenizer for "
            f"{texts[0][:40]!r}...: the model would see different text than it was trained on"
        )
    return reference, batch


def validate(
    source: Path,
    exported: Path,
    info: CheckpointInfo,
    tol: Tolerance,
    max_tokens: int,
    *,
    trust_remote_code: bool,
    onnx: bool = True,
) -> dict[str, Any]:
    """Check the exported dir against the checkpoint; raise ValidationError on a difference.

    Inputs run through the models are cut to max_tokens (when the model takes more); the
    tokenizers are still compared at the model's full length.
    """
    if not onnx:
        return tokenizer_only(source, exported, info, tol, trust_remote_code=trust_remote_code)
    if info.task.generative:
        found = validate_generation.validate(
            source, exported, info, tol, max_tokens, trust_remote_code=trust_remote_code
        )
    else:
        found = _encoder(
            source, exported, info, tol, max_tokens, trust_remote_code=trust_remote_code
        )
    return {
        "compared": ONNX_VS_PYTORCH,
        "validated_length": min(max_tokens, info.max_length),
        **found,
    }


def tokenizer_only(
    source: Path, exported: Path, info: CheckpointInfo, tol: Tolerance, *, trust_remote_code: bool
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
        pairs = pair_case(info.task, info.max_length)
        _, batch = _checked_pairs(encoder, tokenizer, info.task, pairs)
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
        "atol": tol.atol,
        "rtol": tol.rtol,
        "max_abs_diff": 0.0,
        "cases": cases_,
    }


def _encoder(
    source: Path,
    exported: Path,
    info: CheckpointInfo,
    tol: Tolerance,
    max_tokens: int,
    *,
    trust_remote_code: bool,
) -> dict[str, Any]:
    """Compare outputs case by case; ValidationError out of tolerance or on a tokenizer mismatch."""
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
    backend = OnnxBackend(exported / "model.onnx", "cpu")
    full = TextEncoder(exported, info.max_length)
    bounded = full if info.max_length <= max_tokens else TextEncoder(exported, max_tokens)

    results: list[dict[str, Any]] = []
    for texts in cases(info.max_length):
        reference_batch, batch = _checked_texts(bounded, tokenizer, texts)
        reference = _forward(model, reference_batch)
        results.append(_compare(backend, batch, reference, info, tol))
    if bounded is not full:
        # The over-long inputs at the model's own limit: same ids, not run through the models.
        _, batch = _checked_texts(full, tokenizer, cases(info.max_length)[-1])
        results.append(_tokenizer_case(batch))
    if info.task in PAIR_TRUNCATION:
        pairs = pair_case(info.task, info.max_length)
        reference_batch, batch = _checked_pairs(bounded, tokenizer, info.task, pairs)
        reference = _forward(model, reference_batch)
        results.append(
            {**_compare(backend, batch, reference, info, tol), "pairs": PAIR_TRUNCATION[info.task]}
        )
        if bounded is not full:
            _, batch = _checked_pairs(full, tokenizer, info.task, pairs)
            results.append({**_tokenizer_case(batch), "pairs": PAIR_TRUNCATION[info.task]})
    compared = [case for case in results if "max_abs_diff" in case]
    return {
        "atol": tol.atol,
        "rtol": tol.rtol,
        "max_abs_diff": max(case["max_abs_diff"] for case in compared),
        "tolerance_used": max(case["tolerance_used"] for case in compared),
        "cases": results,
    }


def _tokenizer_case(batch: EncodedBatch) -> dict[str, Any]:
    return {
        "batch": int(batch.input_ids.shape[0]),
        "seq_len": int(batch.input_ids.shape[1]),
        "tokenizer": "same ids",
    }


def output(outputs: dict[str, npt.NDArray[np.float32]], name: str) -> npt.NDArray[np.float32]:
    """The named output, or the graph's first when it names it differently (as served)."""
    found = outputs.get(name)
    return next(iter(outputs.values())) if found is None else found


def served_outputs(
    outputs: dict[str, npt.NDArray[np.float32]], mask: npt.NDArray[np.int64], info: CheckpointInfo
) -> list[npt.NDArray[np.float32]]:
    """What callers can see of a batch's outputs: real tokens only (padded positions never
    reach a caller), and for embeddings the pooled vectors too."""
    if info.task is Task.EMBED:
        assert info.pooling is not None
        hidden = output(outputs, "last_hidden_state")
        return [
            np.where(mask[..., None] > 0, hidden, 0),
            embed.pool(hidden, mask, info.pooling.mode),
        ]
    if info.task is Task.EXTRACT_ENTITIES:
        return [np.where(mask[..., None] > 0, output(outputs, "logits"), 0)]
    return [output(outputs, "logits")]


def _compare(
    backend: OnnxBackend,
    batch: EncodedBatch,
    reference: Any,
    info: CheckpointInfo,
    tol: Tolerance,
) -> dict[str, Any]:
    """One case's figures; ValidationError when ONNX is out of tolerance of PyTorch."""
    mask = batch.attention_mask
    expected_outputs = {
        "last_hidden_state" if info.task is Task.EMBED else "logits": (
            reference.last_hidden_state if info.task is Task.EMBED else reference.logits
        ).numpy()
    }
    actual = served_outputs(backend.run(batch.feed()), mask, info)
    expected = served_outputs(expected_outputs, mask, info)
    found = [closeness(a, e, tol) for a, e in zip(actual, expected, strict=True)]
    shape = (int(batch.input_ids.shape[0]), int(batch.input_ids.shape[1]))
    for result in found:
        if not result.passed:
            raise refusal("ONNX outputs", result, tol, shape)
    return {
        "batch": shape[0],
        "seq_len": shape[1],
        "max_abs_diff": max(r.max_abs_diff for r in found),
        "tolerance_used": max(r.tolerance_used for r in found),
    }
