"""How close a quantized model is to its fp32 export, measured through the sidecar's own
tokenizer, ONNX backend and post-processing, and the gate that refuses a lossy one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from export.checkpoint import CheckpointInfo
from export.errors import ValidationError
from sidecar.models.manifest import Task
from sidecar.runtime.onnx import OnnxBackend
from sidecar.tasks import classify, embed
from sidecar.tasks.tokenization import TextEncoder

FloatArray = npt.NDArray[np.float32]

# Short and long, punctuation, code and numbers, several scripts: the inputs where 8-bit
# activations lose the most are the very short ones and those with rare tokens. Characters
# that look Latin but are not (RUF001) are the point of the non-Latin lines.
TEXTS = (
    "ok",
    "Hello, world!",
    "...!!!???",
    "Refund not received after 14 days.",
    "Invoice #123-456: €1.299,00 due 2024-03-01 (qty 3 × 433,00).",  # noqa: RUF001
    "¿Dónde está mi pedido? Lo pagué hace una semana.",
    "Café déjà vu — naïve façade, crème brûlée.",
    "Die Lieferung kam beschädigt an; bitte um Ersatz oder Erstattung.",
    "Привет! Заказ не пришёл, а деньги списали дважды.",  # noqa: RUF001
    "Η παραγγελία μου δεν έφτασε ακόμα.",  # noqa: RUF001
    "東京の天気は晴れです。明日は雨が降るでしょう。",
    "我的发票有错误，请帮忙修改。",  # noqa: RUF001
    "비밀번호를 재설정하려면 어떻게 하나요?",
    "مرحبا، لم أستلم طلبي بعد.",
    "שלום, ההזמנה שלי לא הגיעה.",
    "मेरा ऑर्डर अभी तक नहीं आया है।",
    "Rocket launch 🚀🔥 at 10:30 UTC!!! 👍",
    "ERROR 500: NullPointerException at com.acme.Api.call(Api.java:42)",
    "SELECT * FROM users WHERE id = 42; -- why is this so slow?",
    "The app crashes whenever I upload a photo larger than 10 MB; please advise, it's urgent!",
    "I was charged twice for my subscription this month and nobody answered my three emails.",
    "Machine learning models map sentences of different lengths into one vector space, which "
    "makes semantic search and clustering of support tickets possible.",
)
# The gate's defaults (--int8-min-cosine, --int8-min-agreement).
MIN_COSINE = 0.99
MIN_AGREEMENT = 0.9
# Far over the usual 512-token limit of an encoder, so truncation is exercised too.
_LONG_REPEATS = 100


def texts() -> list[str]:
    """The fixed sentences, plus two inputs long enough to be truncated."""
    return [
        *TEXTS,
        " ".join(["The customer reports the export fails on large reports."] * _LONG_REPEATS),
        " ".join(TEXTS[3:16] * (_LONG_REPEATS // 10)),  # many scripts in one input
    ]


def _rows(
    encoder: TextEncoder, backend: OnnxBackend, info: CheckpointInfo, batch: Sequence[str]
) -> FloatArray:
    """What a caller gets per text: unit-length embeddings, or label probabilities."""
    encoded = encoder.encode(batch, truncate=True)
    outputs = backend.run(encoded.feed())
    if info.task is Task.EMBED:
        assert info.pooling is not None
        pooled = embed.pool(outputs["last_hidden_state"], encoded.attention_mask, info.pooling.mode)
        return embed.normalize(pooled)
    return classify.probabilities(outputs["logits"], multi_label=info.multi_label)


def _served(
    encoder: TextEncoder, backend: OnnxBackend, info: CheckpointInfo, inputs: list[str]
) -> FloatArray:
    # Dynamic quantization scales activations per batch, so a text's int8 result depends on
    # what it is batched with: measure every text padded in one batch and alone.
    together = _rows(encoder, backend, info, inputs)
    alone = [_rows(encoder, backend, info, [text]) for text in inputs]
    return np.concatenate([together, *alone])


def embedding_quality(reference: FloatArray, quantized: FloatArray) -> dict[str, float]:
    """Cosine similarity of matching unit-length rows: the worst and the mean."""
    cosines = np.sum(reference.astype(np.float64) * quantized.astype(np.float64), axis=1)
    # min/mean propagate NaN, so a NaN embedding reports (and fails) as NaN.
    return {"cosine_min": float(np.min(cosines)), "cosine_mean": float(np.mean(cosines))}


def classifier_quality(reference: FloatArray, quantized: FloatArray) -> dict[str, float]:
    """Share of rows with the same top-1 label, and the largest probability difference."""
    agree = np.argmax(reference, axis=1) == np.argmax(quantized, axis=1)
    diff = np.abs(reference.astype(np.float64) - quantized.astype(np.float64))
    return {"top1_agreement": float(np.mean(agree)), "max_abs_prob_diff": float(np.max(diff))}


def measure(model_dir: Path, fp32: Path, quantized: Path, info: CheckpointInfo) -> dict[str, Any]:
    """Compare the quantized model file with the fp32 one on texts(), the way the sidecar serves."""
    encoder = TextEncoder(model_dir, info.max_length)
    inputs = texts()
    reference = _served(encoder, OnnxBackend(fp32, "cpu"), info, inputs)
    candidate = _served(encoder, OnnxBackend(quantized, "cpu"), info, inputs)
    compare = embedding_quality if info.task is Task.EMBED else classifier_quality
    return {
        "sentences": len(inputs),
        "runs": "all sentences in one padded batch, then each alone",
        **compare(reference, candidate),
    }


def check(quality: dict[str, Any], task: Task, min_cosine: float, min_agreement: float) -> None:
    """Raise ValidationError when the quantized model is further from fp32 than allowed."""
    # `not x >= bar` is true for NaN: a NaN measurement always fails.
    if task is Task.EMBED:
        worst = quality["cosine_min"]
        if not worst >= min_cosine:
            raise ValidationError(
                f"int8 embeddings drift from fp32: min cosine {worst:.4f} over "
                f"{quality['sentences']} sentences is below --int8-min-cosine {min_cosine}; "
                "export without --quantize, or lower the bar if that loss is acceptable"
            )
        return
    agreement = quality["top1_agreement"]
    if not agreement >= min_agreement:
        raise ValidationError(
            f"int8 classifier picks another top label than fp32: agreement {agreement:.1%} over "
            f"{quality['sentences']} sentences is below --int8-min-agreement {min_agreement}; "
            "export without --quantize, or lower the bar if that loss is acceptable"
        )
