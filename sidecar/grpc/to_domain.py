"""Protobuf requests -> domain requests (and deadlines from the call context)."""

from __future__ import annotations

import time
from typing import Any

import grpc

from sidecar.domain import (
    ChatMessage,
    ClassifyRequest,
    EmbedRequest,
    ExtractEntitiesRequest,
    GenerateRequest,
    RerankRequest,
    TokenizeRequest,
)
from sidecar.v1 import inference_pb2 as pb


def deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The call's deadline as a time.monotonic() value, or None when it has none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def embed(request: pb.EmbedRequest) -> EmbedRequest:
    """EmbedRequest; unset optional fields take their documented defaults."""
    return EmbedRequest(
        model=request.model,
        inputs=list(request.inputs),
        normalize=request.normalize if request.HasField("normalize") else None,
        truncate=request.truncate if request.HasField("truncate") else True,
    )


def classify(request: pb.ClassifyRequest) -> ClassifyRequest:
    """ClassifyRequest; top_k 0 means all labels."""
    return ClassifyRequest(
        model=request.model,
        inputs=list(request.inputs),
        top_k=request.top_k,
        truncate=request.truncate if request.HasField("truncate") else True,
        candidate_labels=list(request.candidate_labels),
        hypothesis_template=request.hypothesis_template,
        multi_label=request.multi_label,
    )


AGGREGATIONS = {
    pb.AGGREGATION_STRATEGY_UNSPECIFIED: "simple",
    pb.AGGREGATION_STRATEGY_NONE: "none",
    pb.AGGREGATION_STRATEGY_SIMPLE: "simple",
    pb.AGGREGATION_STRATEGY_FIRST: "first",
    pb.AGGREGATION_STRATEGY_AVERAGE: "average",
    pb.AGGREGATION_STRATEGY_MAX: "max",
}


def extract_entities(request: pb.ExtractEntitiesRequest) -> ExtractEntitiesRequest:
    """ExtractEntitiesRequest; an unknown aggregation value is passed on to be refused."""
    return ExtractEntitiesRequest(
        model=request.model,
        inputs=list(request.inputs),
        aggregation=AGGREGATIONS.get(request.aggregation, f"unknown value {request.aggregation}"),
        truncate=request.truncate if request.HasField("truncate") else True,
    )


def rerank(request: pb.RerankRequest) -> RerankRequest:
    """RerankRequest; top_n 0 means every passage."""
    return RerankRequest(
        model=request.model,
        query=request.query,
        inputs=list(request.inputs),
        top_n=request.top_n,
        return_text=request.return_text,
        truncate=request.truncate if request.HasField("truncate") else True,
    )


def tokenize(request: pb.TokenizeRequest) -> TokenizeRequest:
    """TokenizeRequest; special tokens on and truncation off unless set."""
    return TokenizeRequest(
        model=request.model,
        inputs=list(request.inputs),
        add_special_tokens=(
            request.add_special_tokens if request.HasField("add_special_tokens") else True
        ),
        truncate=request.truncate if request.HasField("truncate") else False,
    )


def generate(request: pb.GenerateRequest) -> GenerateRequest:
    """GenerateRequest; unset optional parameters stay None (the model's defaults)."""

    def optional(name: str) -> Any:
        return getattr(request, name) if request.HasField(name) else None  # type: ignore[arg-type]

    return GenerateRequest(
        model=request.model,
        prompt=request.prompt,
        messages=[ChatMessage(m.role, m.content) for m in request.messages],
        max_new_tokens=request.max_new_tokens,
        temperature=optional("temperature"),
        top_k=optional("top_k"),
        top_p=optional("top_p"),
        repetition_penalty=optional("repetition_penalty"),
        stop=list(request.stop),
        seed=optional("seed"),
        truncate=request.truncate if request.HasField("truncate") else True,
    )
