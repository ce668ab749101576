"""Rerank: passages scored against a query by a cross-encoder, most relevant first."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sidecar.domain import CallInfo, RankedPassage, RerankRequest, RerankResult
from sidecar.errors import InvalidInputError, ModelLoadError
from sidecar.models.manifest import Manifest, Task
from sidecar.tasks import pairs
from sidecar.tasks.base import EncoderTask, InputLimits, Prepared, Rows, TaskModel, output
from sidecar.tasks.checks import check_inputs, check_non_negative
from sidecar.tasks.tokenization import EncodedBatch, EncodedText


class RerankTask(EncoderTask[RerankRequest, RerankResult]):
    """Each passage paired with the query; one logit per pair."""

    task = Task.RERANK
    rpc = "Rerank"
    pairs = True
    request_type = RerankRequest

    def check_manifest(self, model_dir: Path, manifest: Manifest) -> None:
        if len(manifest.labels) != 1:
            raise ModelLoadError(
                f"{model_dir}: a reranker scores each pair with one logit, but this model "
                f"has {len(manifest.labels)} labels; export a cross-encoder with num_labels=1"
            )

    def check(self, request: RerankRequest, limits: InputLimits) -> None:
        if not request.query.strip():
            raise InvalidInputError("query is empty or whitespace-only: send the search query")
        check_inputs(request.inputs, limits.max_passages, limit_name="max_rerank_passages")
        check_non_negative("top_n", request.top_n)

    def prepare(self, model: TaskModel, request: RerankRequest, limits: InputLimits) -> Prepared:
        query_pairs = [(request.query, passage) for passage in request.inputs]
        return Prepared(
            len(query_pairs),
            lambda: model.encoder.encode_pairs(
                query_pairs, truncate=request.truncate, keep="first"
            ),
            [request.query, *request.inputs],
        )

    def reduce(
        self,
        model: TaskModel,
        outputs: Mapping[str, Rows],
        batch: EncodedBatch,
        items: Sequence[EncodedText],
    ) -> Rows:
        return output(outputs, "logits").astype(np.float32)

    def finish(
        self,
        model: TaskModel,
        rows: Rows,
        items: Sequence[EncodedText],
        request: RerankRequest,
        prepared: Prepared,
        info: CallInfo,
    ) -> RerankResult:
        # Relevance is the sigmoid of the cross-encoder's logit; the order is the logit's.
        raw = rows[:, 0]
        scores = pairs.sigmoid(raw)
        order = np.argsort(-raw, kind="stable")
        if request.top_n:
            order = order[: request.top_n]
        results = [
            RankedPassage(
                index=int(i),
                score=float(scores[i]),
                raw_score=float(raw[i]),
                text=request.inputs[i] if request.return_text else "",
                truncated=items[i].truncated,
            )
            for i in order
        ]
        return RerankResult(results=results, info=info)


TASK = RerankTask()
