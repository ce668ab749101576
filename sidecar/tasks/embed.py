"""Embed: token vectors pooled into one embedding, as sentence-transformers' Pooling does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sidecar.domain import CallInfo, Embedding, EmbedRequest, EmbedResult
from sidecar.errors import ModelLoadError
from sidecar.models.manifest import Manifest, Task
from sidecar.tasks.base import (
    EncoderTask,
    InputLimits,
    Prepared,
    TaskModel,
    each_text,
    output,
)
from sidecar.tasks.checks import check_inputs
from sidecar.tasks.tokenization import EncodedBatch, EncodedText

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")

FloatArray = npt.NDArray[np.float32]


def pool(hidden: FloatArray, mask: npt.NDArray[np.int64], mode: str) -> FloatArray:
    """Reduce [batch, seq, dim] token vectors to [batch, dim], ignoring padding."""
    weights = mask[..., None].astype(hidden.dtype)
    # Select rather than multiply: a NaN at a padded position times 0 is still NaN.
    masked = np.where(weights > 0, hidden, 0).astype(hidden.dtype)
    pooled: FloatArray
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "lasttoken":
        pooled = hidden[np.arange(hidden.shape[0]), mask.sum(axis=1) - 1]
    elif mode == "max":
        # Padding must never win the max.
        pooled = np.where(weights > 0, hidden, np.finfo(hidden.dtype).min).max(axis=1)
    elif mode in ("mean", "mean_sqrt_len"):
        counts = np.clip(weights.sum(axis=1), 1e-9, None)
        summed = masked.sum(axis=1)
        pooled = summed / (counts if mode == "mean" else np.sqrt(counts))
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; known: {', '.join(POOLING_MODES)}")
    return pooled


def normalize(vectors: FloatArray) -> FloatArray:
    """Scale rows to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    scaled: FloatArray = vectors / np.clip(norms, 1e-12, None)
    return scaled


class EmbedTask(EncoderTask[EmbedRequest, EmbedResult]):
    """Embeddings for a batch of texts."""

    task = Task.EMBED
    rpc = "Embed"
    request_type = EmbedRequest

    def check_manifest(self, model_dir: Path, manifest: Manifest) -> None:
        if manifest.pooling is None:
            raise ModelLoadError(f"{model_dir}: an embedding model needs pooling in its manifest")

    def check(self, request: EmbedRequest, limits: InputLimits) -> None:
        check_inputs(request.inputs, limits.max_inputs)

    def prepare(self, model: TaskModel, request: EmbedRequest, limits: InputLimits) -> Prepared:
        return each_text(model, request.inputs, truncate=request.truncate)

    def reduce(
        self,
        model: TaskModel,
        outputs: Mapping[str, FloatArray],
        batch: EncodedBatch,
        items: Sequence[EncodedText],
    ) -> FloatArray:
        # Pooled, not yet normalized: whether to normalize is each call's own choice.
        pooling = model.manifest.pooling
        assert pooling is not None  # check_manifest refused the model otherwise
        return pool(output(outputs, "last_hidden_state"), batch.attention_mask, pooling.mode)

    def finish(
        self,
        model: TaskModel,
        rows: FloatArray,
        items: Sequence[EncodedText],
        request: EmbedRequest,
        prepared: Prepared,
        info: CallInfo,
    ) -> EmbedResult:
        pooling = model.manifest.pooling
        assert pooling is not None
        if pooling.normalize if request.normalize is None else request.normalize:
            rows = normalize(rows)
        result = [
            Embedding(values=rows[i], token_count=item.length, truncated=item.truncated)
            for i, item in enumerate(items)
        ]
        return EmbedResult(embeddings=result, dimensions=int(rows.shape[1]), info=info)


TASK = EmbedTask()
