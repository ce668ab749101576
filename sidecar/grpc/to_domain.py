"""Protobuf requests -> domain requests (and deadlines from the call context)."""

from __future__ import annotations

import time
from typing import Any

import grpc

from sidecar.domain import ClassifyRequest, EmbedRequest, TokenizeRequest
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
