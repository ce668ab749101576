"""A loaded model: tokenizer, backend and the task's pre/post-processing, timed per stage.

Every method is blocking and runs on an executor thread, never on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sidecar.batching.batcher import BatchOutput
from sidecar.domain import (
    CallInfo,
    Classification,
    ClassifyResult,
    Embedding,
    EmbedResult,
    EntityList,
    ExtractEntitiesResult,
    RankedPassage,
    RerankResult,
    TokenizeResult,
)
from sidecar.models.manifest import Manifest, Task
from sidecar.runtime.backend import Backend
from sidecar.tasks import classify, embed, entities, pairs
from sidecar.tasks.tokenization import EncodedText, TextEncoder

WARM_UP_TEXT = "Warm-up: the sidecar runs one short and one full-length input before serving."


def _us(start_ns: int, end_ns: int) -> int:
    return (end_ns - start_ns) // 1000


def _output(outputs: dict[str, npt.NDArray[np.float32]], name: str) -> npt.NDArray[np.float32]:
    """The named output, or the graph's only one when it names it differently."""
    found = outputs.get(name)
    return next(iter(outputs.values())) if found is None else found


class LoadedModel:
    """What every loaded model offers, whatever its task: identity, tokenizer, Tokenize."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        manifest: Manifest,
        encoder: TextEncoder,
        backend_name: str,
        device: str,
    ) -> None:
        self.name = name
        self.model_dir = model_dir
        self.manifest = manifest
        self.encoder = encoder
        self.backend_name = backend_name
        self.device = device

    @property
    def task(self) -> Task:
        """The task from the manifest."""
        return self.manifest.task

    def call_info(self) -> CallInfo:
        """A CallInfo naming this model, with zero timings."""
        return CallInfo(
            model=self.name,
            revision=self.manifest.digest,
            backend=self.backend_name,
            device=self.device,
        )

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
        """Run the model once or twice so the first real call pays no allocation cost."""
        raise NotImplementedError


class ServedModel(LoadedModel):
    """An encoder model (embeddings, classification) ready for calls; thread-safe."""

    def __init__(
        self, name: str, model_dir: Path, manifest: Manifest, encoder: TextEncoder, backend: Backend
    ) -> None:
        super().__init__(name, model_dir, manifest, encoder, backend.name, backend.device)
        self.backend = backend

    def encode(self, texts: Sequence[str], truncate: bool) -> list[EncodedText]:
        """The model's ids for each text, unpadded; over-long ones cut when `truncate`."""
        return self.encoder.encode_each(texts, truncate)

    def infer(self, items: Sequence[EncodedText]) -> BatchOutput:
        """One forward pass over a batch, reduced to one row per input.

        Embedding models give pooled (not yet normalized) vectors, classifiers give label
        probabilities; what differs per call (normalize, top_k) is left to the result
        builders so inputs of different calls can share a batch.
        """
        batch = self.encoder.pad(items)
        t0 = time.perf_counter_ns()
        outputs = self.backend.run(batch.feed())
        t1 = time.perf_counter_ns()
        if self.task is Task.EMBED:
            # The registry routes only embedding models here; preflight guarantees pooling.
            assert self.manifest.pooling is not None
            hidden = _output(outputs, "last_hidden_state")
            rows = embed.pool(hidden, batch.attention_mask, self.manifest.pooling.mode)
        elif self.task is Task.CLASSIFY:
            rows = classify.probabilities(_output(outputs, "logits"), self.manifest.multi_label)
        elif self.task is Task.EXTRACT_ENTITIES:
            # Label probabilities per token, padded to the model's max length so every
            # batch's rows have one shape; each input's own tokens are read back by length.
            probs = entities.softmax(_output(outputs, "logits").astype(np.float32))
            rows = np.zeros((len(items), self.encoder.max_length, probs.shape[-1]), np.float32)
            rows[:, : probs.shape[1]] = probs
        else:  # rerank and zero-shot: the raw logits of each pair
            rows = _output(outputs, "logits").astype(np.float32)
        return BatchOutput(
            rows=rows,
            inference_us=_us(t0, t1),
            postprocess_us=_us(t1, time.perf_counter_ns()),
        )

    def embed_result(
        self,
        vectors: npt.NDArray[np.float32],
        items: Sequence[EncodedText],
        normalize: bool | None,
        info: CallInfo,
    ) -> EmbedResult:
        """Embeddings from pooled rows, normalized unless the call or the model says not to."""
        assert self.manifest.pooling is not None
        t0 = time.perf_counter_ns()
        if self.manifest.pooling.normalize if normalize is None else normalize:
            vectors = embed.normalize(vectors)
        result = [
            Embedding(values=vectors[i], token_count=item.length, truncated=item.truncated)
            for i, item in enumerate(items)
        ]
        info.postprocess_us += _us(t0, time.perf_counter_ns())
        return EmbedResult(embeddings=result, dimensions=int(vectors.shape[1]), info=info)

    def classify_result(
        self,
        scores: npt.NDArray[np.float32],
        items: Sequence[EncodedText],
        top_k: int,
        info: CallInfo,
    ) -> ClassifyResult:
        """Classifications from probability rows: labels sorted, top_k of them when > 0."""
        t0 = time.perf_counter_ns()
        results = [
            Classification(
                labels=classify.ranked(scores[i], self.manifest.labels, top_k),
                token_count=item.length,
                truncated=item.truncated,
            )
            for i, item in enumerate(items)
        ]
        info.postprocess_us += _us(t0, time.perf_counter_ns())
        return ClassifyResult(results=results, multi_label=self.manifest.multi_label, info=info)

    def entities_result(
        self,
        rows: npt.NDArray[np.float32],
        items: Sequence[EncodedText],
        texts: Sequence[str],
        strategy: str,
        info: CallInfo,
    ) -> ExtractEntitiesResult:
        """Entities of each input from its per-token label probabilities."""
        t0 = time.perf_counter_ns()
        results = [
            EntityList(
                entities=entities.extract(
                    text,
                    rows[i][: item.length],
                    item,
                    self.manifest.labels,
                    strategy,
                    self.encoder.continuing_subword_prefix,
                    self.encoder.unk_id,
                ),
                token_count=item.length,
                truncated=item.truncated,
            )
            for i, (item, text) in enumerate(zip(items, texts, strict=True))
        ]
        info.postprocess_us += _us(t0, time.perf_counter_ns())
        return ExtractEntitiesResult(results=results, info=info)

    def rerank_result(
        self,
        rows: npt.NDArray[np.float32],
        items: Sequence[EncodedText],
        passages: Sequence[str],
        top_n: int,
        return_text: bool,
        info: CallInfo,
    ) -> RerankResult:
        """Passages sorted by relevance (sigmoid of the cross-encoder's logit)."""
        t0 = time.perf_counter_ns()
        raw = rows[:, 0]
        scores = pairs.sigmoid(raw)
        order = np.argsort(-raw, kind="stable")
        if top_n:
            order = order[:top_n]
        results = [
            RankedPassage(
                index=int(i),
                score=float(scores[i]),
                raw_score=float(raw[i]),
                text=passages[i] if return_text else "",
                truncated=items[i].truncated,
            )
            for i in order
        ]
        info.postprocess_us += _us(t0, time.perf_counter_ns())
        return RerankResult(results=results, info=info)

    def zero_shot_result(
        self,
        rows: npt.NDArray[np.float32],
        items: Sequence[EncodedText],
        candidates: Sequence[str],
        multi_label: bool,
        top_k: int,
        info: CallInfo,
    ) -> ClassifyResult:
        """Each input's candidate labels, best first, from its pairs' NLI logits."""
        t0 = time.perf_counter_ns()
        entail = pairs.entailment_id(self.manifest.labels)
        width = len(candidates)
        results = []
        for start in range(0, len(items), width):
            scores = pairs.zero_shot(rows[start : start + width], entail, multi_label)
            own = items[start : start + width]
            results.append(
                Classification(
                    labels=classify.ranked(scores, candidates, top_k),
                    token_count=max(item.length for item in own),
                    truncated=any(item.truncated for item in own),
                )
            )
        info.postprocess_us += _us(t0, time.perf_counter_ns())
        return ClassifyResult(results=results, multi_label=multi_label or width == 1, info=info)

    def _direct(
        self, texts: Sequence[str], truncate: bool
    ) -> tuple[list[EncodedText], BatchOutput, CallInfo]:
        """Encode and run texts as one batch, outside any queue."""
        info = self.call_info()
        t0 = time.perf_counter_ns()
        items = self.encode(texts, truncate)
        info.tokenize_us = _us(t0, time.perf_counter_ns())
        output = self.infer(items)
        info.inference_us, info.postprocess_us = output.inference_us, output.postprocess_us
        info.batch_size = len(items)
        return items, output, info

    def embed(self, texts: Sequence[str], normalize: bool | None, truncate: bool) -> EmbedResult:
        """Embeddings for texts run as one batch (warm-up and export validation use this)."""
        items, output, info = self._direct(texts, truncate)
        return self.embed_result(output.rows, items, normalize, info)

    def classify(self, texts: Sequence[str], top_k: int, truncate: bool) -> ClassifyResult:
        """Classifications for texts run as one batch."""
        items, output, info = self._direct(texts, truncate)
        return self.classify_result(output.rows, items, top_k, info)

    def warm_up(self) -> None:
        """Run a short and a full-length batch so the first real call pays no allocation cost."""
        long_text = " ".join([WARM_UP_TEXT] * self.encoder.max_length)
        self.infer(self.encode([WARM_UP_TEXT, long_text], truncate=True))
