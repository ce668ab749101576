"""A loaded model: tokenizer, backend and the task's pre/post-processing, timed per stage.

Every method is blocking and runs on an executor thread, never on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sidecar.domain import (
    CallInfo,
    Classification,
    ClassifyResult,
    Embedding,
    EmbedResult,
    TokenizeResult,
)
from sidecar.models.manifest import Manifest, Task
from sidecar.runtime.backend import Backend
from sidecar.tasks import classify, embed
from sidecar.tasks.tokenization import EncodedBatch, TextEncoder

WARM_UP_TEXT = "Warm-up: the sidecar runs one short and one full-length input before serving."


def _us(start_ns: int, end_ns: int) -> int:
    return (end_ns - start_ns) // 1000


class ServedModel:
    """One model dir ready for calls; safe to call from several threads."""

    def __init__(
        self, name: str, model_dir: Path, manifest: Manifest, encoder: TextEncoder, backend: Backend
    ) -> None:
        self.name = name
        self.model_dir = model_dir
        self.manifest = manifest
        self.encoder = encoder
        self.backend = backend

    @property
    def task(self) -> Task:
        """The task from the manifest."""
        return self.manifest.task

    def call_info(self) -> CallInfo:
        """A CallInfo naming this model, with zero timings."""
        return CallInfo(
            model=self.name,
            revision=self.manifest.digest,
            backend=self.backend.name,
            device=self.backend.device,
        )

    def _forward(
        self, texts: Sequence[str], truncate: bool, info: CallInfo, output: str
    ) -> tuple[EncodedBatch, npt.NDArray[np.float32]]:
        """Tokenize and run the batch; return the named output (or the graph's only one)."""
        t0 = time.perf_counter_ns()
        batch = self.encoder.encode(texts, truncate)
        t1 = time.perf_counter_ns()
        outputs = self.backend.run(
            {
                "input_ids": batch.input_ids,
                "attention_mask": batch.attention_mask,
                "token_type_ids": batch.token_type_ids,
            }
        )
        t2 = time.perf_counter_ns()
        info.tokenize_us, info.inference_us = _us(t0, t1), _us(t1, t2)
        info.batch_size = len(texts)
        found = outputs.get(output)
        return batch, next(iter(outputs.values())) if found is None else found

    def embed(self, texts: Sequence[str], normalize: bool | None, truncate: bool) -> EmbedResult:
        """Pooled (and by default normalized) embeddings."""
        # The registry routes only embedding models here; preflight guarantees pooling.
        assert self.manifest.pooling is not None
        info = self.call_info()
        batch, hidden = self._forward(texts, truncate, info, "last_hidden_state")
        t0 = time.perf_counter_ns()
        vectors = embed.pool(hidden, batch.attention_mask, self.manifest.pooling.mode)
        if self.manifest.pooling.normalize if normalize is None else normalize:
            vectors = embed.normalize(vectors)
        result = [
            Embedding(
                values=vectors[i], token_count=batch.token_counts[i], truncated=batch.truncated[i]
            )
            for i in range(len(texts))
        ]
        info.postprocess_us = _us(t0, time.perf_counter_ns())
        return EmbedResult(embeddings=result, dimensions=int(vectors.shape[1]), info=info)

    def classify(self, texts: Sequence[str], top_k: int, truncate: bool) -> ClassifyResult:
        """Label probabilities, sorted, top_k of them when top_k > 0."""
        info = self.call_info()
        batch, logits = self._forward(texts, truncate, info, "logits")
        t0 = time.perf_counter_ns()
        scores = classify.probabilities(logits, self.manifest.multi_label)
        results = [
            Classification(
                labels=classify.ranked(scores[i], self.manifest.labels, top_k),
                token_count=batch.token_counts[i],
                truncated=batch.truncated[i],
            )
            for i in range(len(texts))
        ]
        info.postprocess_us = _us(t0, time.perf_counter_ns())
        return ClassifyResult(results=results, multi_label=self.manifest.multi_label, info=info)

    def tokenize(
        self, texts: Sequence[str], add_special_tokens: bool, truncate: bool
    ) -> TokenizeResult:
        """The model's tokens for each text."""
        info = self.call_info()
        t0 = time.perf_counter_ns()
        tokens = self.encoder.tokenize(texts, add_special_tokens, truncate)
        info.tokenize_us = _us(t0, time.perf_counter_ns())
        info.batch_size = len(texts)
        return TokenizeResult(results=tokens, max_length=self.encoder.max_length, info=info)

    def warm_up(self) -> None:
        """Run a short and a full-length batch so the first real call pays no allocation cost."""
        long_text = " ".join([WARM_UP_TEXT] * self.encoder.max_length)
        texts = [WARM_UP_TEXT, long_text]
        if self.task is Task.EMBED:
            self.embed(texts, normalize=None, truncate=True)
        else:
            self.classify(texts, top_k=1, truncate=True)
