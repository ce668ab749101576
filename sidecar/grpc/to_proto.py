"""Domain results -> protobuf responses."""

from __future__ import annotations

from sidecar.domain import (
    CallInfo,
    ClassifyResult,
    EmbedResult,
    ExtractEntitiesResult,
    FinishReason,
    GenerateChunk,
    ModelState,
    ModelStatus,
    RerankResult,
    TokenizeResult,
)
from sidecar.models.manifest import Task
from sidecar.v1 import common_pb2, models_pb2
from sidecar.v1 import inference_pb2 as pb

TASKS = {
    Task.EMBED: common_pb2.TASK_EMBED,
    Task.CLASSIFY: common_pb2.TASK_CLASSIFY,
    Task.GENERATE: common_pb2.TASK_GENERATE,
    Task.SEQ2SEQ: common_pb2.TASK_GENERATE,
    Task.EXTRACT_ENTITIES: common_pb2.TASK_EXTRACT_ENTITIES,
    Task.RERANK: common_pb2.TASK_RERANK,
    Task.ZERO_SHOT: common_pb2.TASK_ZERO_SHOT,
}
FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.COMPLETE: pb.FINISH_REASON_COMPLETE,
}
STATES = {
    ModelState.LOADING: models_pb2.MODEL_STATE_LOADING,
    ModelState.SERVING: models_pb2.MODEL_STATE_SERVING,
    ModelState.FAILED: models_pb2.MODEL_STATE_FAILED,
}


def metadata(info: CallInfo) -> common_pb2.ResponseMetadata:
    """ResponseMetadata from a CallInfo."""
    return common_pb2.ResponseMetadata(
        model=info.model,
        revision=info.revision,
        backend=info.backend,
        device=info.device,
        queue_us=info.queue_us,
        tokenize_us=info.tokenize_us,
        inference_us=info.inference_us,
        postprocess_us=info.postprocess_us,
        batch_size=info.batch_size,
    )


def embed(result: EmbedResult) -> pb.EmbedResponse:
    """EmbedResponse in input order."""
    return pb.EmbedResponse(
        embeddings=[
            pb.Embedding(values=e.values.tolist(), token_count=e.token_count, truncated=e.truncated)
            for e in result.embeddings
        ],
        dimensions=result.dimensions,
        metadata=metadata(result.info),
    )


def classify(result: ClassifyResult) -> pb.ClassifyResponse:
    """ClassifyResponse in input order."""
    return pb.ClassifyResponse(
        results=[
            pb.Classification(
                labels=[pb.LabelScore(label=s.label, score=s.score, id=s.id) for s in c.labels],
                token_count=c.token_count,
                truncated=c.truncated,
            )
            for c in result.results
        ],
        multi_label=result.multi_label,
        metadata=metadata(result.info),
    )


def tokenize(result: TokenizeResult) -> pb.TokenizeResponse:
    """TokenizeResponse in input order."""
    return pb.TokenizeResponse(
        results=[
            pb.Tokens(
                ids=t.ids,
                tokens=t.tokens,
                offsets=[common_pb2.Span(start=a, end=b) for a, b in t.offsets],
                token_count=len(t.ids),
                truncated=t.truncated,
            )
            for t in result.results
        ],
        max_length=result.max_length,
        metadata=metadata(result.info),
    )


def model_info(status: ModelStatus) -> models_pb2.ModelInfo:
    """ModelInfo from a model's status and manifest."""
    info = models_pb2.ModelInfo(
        name=status.name,
        task=TASKS[status.task] if status.task else common_pb2.TASK_UNSPECIFIED,
        state=STATES[status.state],
        error=status.error,
        backend=status.backend,
        device=status.device,
    )
    manifest = status.manifest
    if manifest is not None:
        info.revision = manifest.digest
        info.source = manifest.source
        info.source_revision = manifest.source_revision or ""
        info.max_length = manifest.max_length
        info.labels.extend(manifest.labels)
        info.dimensions = manifest.dimensions
        info.quantization = manifest.quantization
        info.exported_by.update(manifest.exported_by)
        if manifest.pooling is not None:
            info.pooling = manifest.pooling.mode
            info.normalize = manifest.pooling.normalize
        if manifest.validation is not None:
            info.validation_max_abs_diff = manifest.validation.max_abs_diff
            info.validation_atol = manifest.validation.atol
            info.validation_rtol = manifest.validation.rtol
            info.validation_compared = manifest.validation.compared
    return info


def generate(chunk: GenerateChunk) -> pb.GenerateResponse:
    """One GenerateResponse; finish reason, usage and metadata only on the last."""
    response = pb.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids)
    if chunk.finish is not None:
        response.finish_reason = FINISH_REASONS[chunk.finish]
    if chunk.usage is not None:
        response.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=chunk.usage.prompt_tokens,
                completion_tokens=chunk.usage.completion_tokens,
                truncated_prompt_tokens=chunk.usage.truncated_prompt_tokens,
            )
        )
    if chunk.info is not None:
        response.metadata.CopyFrom(metadata(chunk.info))
    return response


def extract_entities(result: ExtractEntitiesResult) -> pb.ExtractEntitiesResponse:
    """ExtractEntitiesResponse with spans in code points."""
    return pb.ExtractEntitiesResponse(
        results=[
            pb.EntityList(
                entities=[
                    pb.Entity(
                        label=e.label,
                        score=e.score,
                        span=common_pb2.Span(start=e.start, end=e.end),
                        text=e.text,
                    )
                    for e in item.entities
                ],
                token_count=item.token_count,
                truncated=item.truncated,
            )
            for item in result.results
        ],
        metadata=metadata(result.info),
    )


def rerank(result: RerankResult) -> pb.RerankResponse:
    """RerankResponse, most relevant first."""
    return pb.RerankResponse(
        results=[
            pb.RankedPassage(
                index=r.index,
                score=r.score,
                raw_score=r.raw_score,
                text=r.text,
                truncated=r.truncated,
            )
            for r in result.results
        ],
        metadata=metadata(result.info),
    )
