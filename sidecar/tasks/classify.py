"""Classify with fixed labels: classifier logits turned into sorted label probabilities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sidecar.domain import CallInfo, Classification, ClassifyRequest, ClassifyResult, LabelScore
from sidecar.errors import InvalidInputError
from sidecar.models.manifest import Manifest, Task
from sidecar.tasks.base import (
    EncoderTask,
    InputLimits,
    Prepared,
    Rows,
    TaskModel,
    check_labels,
    each_text,
    output,
)
from sidecar.tasks.checks import check_inputs, check_non_negative
from sidecar.tasks.tokenization import EncodedBatch, EncodedText


def probabilities(logits: npt.NDArray[np.float32], *, multi_label: bool) -> npt.NDArray[np.float32]:
    """Sigmoid per label for multi-label models, else a numerically stable softmax."""
    logits = logits.astype(np.float32, copy=False)
    probs: npt.NDArray[np.float32]
    if multi_label:
        probs = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    else:
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs = shifted / shifted.sum(axis=-1, keepdims=True)
    return probs


def ranked(scores: npt.NDArray[np.float32], labels: Sequence[str], top_k: int) -> list[LabelScore]:
    """Labels sorted by score, best first; top_k 0 keeps them all."""
    order = np.argsort(-scores, kind="stable")
    if top_k:
        order = order[:top_k]
    return [LabelScore(label=labels[i], score=float(scores[i]), id=int(i)) for i in order]


class ClassifyTask(EncoderTask[ClassifyRequest, ClassifyResult]):
    """Label probabilities for a batch of texts, from a model with fixed labels."""

    task = Task.CLASSIFY
    rpc = "Classify"
    request_type = ClassifyRequest

    def check_manifest(self, model_dir: Path, manifest: Manifest) -> None:
        check_labels(model_dir, manifest)

    def check(self, request: ClassifyRequest, limits: InputLimits) -> None:
        check_inputs(request.inputs, limits.max_inputs)
        check_non_negative("top_k", request.top_k)

    def prepare(self, model: TaskModel, request: ClassifyRequest, limits: InputLimits) -> Prepared:
        if request.candidate_labels or request.hypothesis_template or request.multi_label:
            raise InvalidInputError(
                f"model {model.name!r} has fixed labels; candidate_labels, "
                "hypothesis_template and multi_label need a zero-shot (NLI) model"
            )
        return each_text(model, request.inputs, truncate=request.truncate)

    def reduce(
        self,
        model: TaskModel,
        outputs: Mapping[str, Rows],
        batch: EncodedBatch,
        items: Sequence[EncodedText],
    ) -> Rows:
        return probabilities(output(outputs, "logits"), multi_label=model.manifest.multi_label)

    def finish(
        self,
        model: TaskModel,
        rows: Rows,
        items: Sequence[EncodedText],
        request: ClassifyRequest,
        prepared: Prepared,
        info: CallInfo,
    ) -> ClassifyResult:
        labels = model.manifest.labels
        results = [
            Classification(
                labels=ranked(rows[i], labels, request.top_k),
                token_count=item.length,
                truncated=item.truncated,
            )
            for i, item in enumerate(items)
        ]
        return ClassifyResult(results=results, multi_label=model.manifest.multi_label, info=info)


TASK = ClassifyTask()
