"""Zero-shot classification: each text against a hypothesis per candidate label, on an NLI model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sidecar.domain import CallInfo, Classification, ClassifyRequest, ClassifyResult
from sidecar.errors import InvalidInputError, ModelLoadError
from sidecar.models.manifest import Manifest, Task
from sidecar.tasks import classify, pairs
from sidecar.tasks.base import EncoderTask, InputLimits, Prepared, Rows, TaskModel, output
from sidecar.tasks.checks import check_candidates
from sidecar.tasks.tokenization import EncodedBatch, EncodedText


class ZeroShotTask(EncoderTask[ClassifyRequest, ClassifyResult]):
    """Every input against every candidate's hypothesis, as one batch of pairs."""

    task = Task.ZERO_SHOT
    rpc = "Classify"
    pairs = True
    request_type = ClassifyRequest

    def check_manifest(self, model_dir: Path, manifest: Manifest) -> None:
        if pairs.entailment_id(manifest.labels) < 0:
            raise ModelLoadError(
                f"{model_dir}: zero-shot classification needs an NLI model with an "
                f"'entailment' label; this one has {list(manifest.labels)}"
            )

    def check(self, request: ClassifyRequest, limits: InputLimits) -> None:
        classify.TASK.check(request, limits)  # one Classify call, whichever model answers

    def prepare(self, model: TaskModel, request: ClassifyRequest, limits: InputLimits) -> Prepared:
        candidates = check_candidates(request.candidate_labels, model.name)
        hypotheses = pairs.hypotheses(request.hypothesis_template, candidates)
        count = len(request.inputs) * len(candidates)
        if count > limits.max_rows:
            raise InvalidInputError(
                f"{len(request.inputs)} inputs x {len(candidates)} candidate labels make "
                f"{count} pairs, over max_queue_size {limits.max_rows}: send "
                "fewer inputs per call"
            )
        premise_pairs = [(text, h) for text in request.inputs for h in hypotheses]
        return Prepared(
            count,
            lambda: model.encoder.encode_pairs(
                premise_pairs, truncate=request.truncate, keep="second"
            ),
            request.inputs,
            candidates,
        )

    def reduce(
        self,
        model: TaskModel,
        outputs: Mapping[str, Rows],
        batch: EncodedBatch,
        items: Sequence[EncodedText],
    ) -> Rows:
        return output(outputs, "logits").astype(np.float32)  # each pair's raw NLI logits

    def finish(
        self,
        model: TaskModel,
        rows: Rows,
        items: Sequence[EncodedText],
        request: ClassifyRequest,
        prepared: Prepared,
        info: CallInfo,
    ) -> ClassifyResult:
        candidates = prepared.extra
        entail = pairs.entailment_id(model.manifest.labels)
        width = len(candidates)
        results = []
        for start in range(0, len(items), width):
            scores = pairs.zero_shot(
                rows[start : start + width], entail, multi_label=request.multi_label
            )
            own = items[start : start + width]
            results.append(
                Classification(
                    labels=classify.ranked(scores, candidates, request.top_k),
                    token_count=max(item.length for item in own),
                    truncated=any(item.truncated for item in own),
                )
            )
        multi_label = request.multi_label or width == 1
        return ClassifyResult(results=results, multi_label=multi_label, info=info)


TASK = ZeroShotTask()
