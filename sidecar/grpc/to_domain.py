"""Protobuf requests -> domain requests (and deadlines from the call context)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from sidecar.domain import (
    ChatMessage,
    ClassifyRequest,
    EmbedRequest,
    ExtractEntitiesRequest,
    FormatKind,
    GenerateRequest,
    RerankRequest,
    ResponseFormat,
    TokenizeRequest,
)
from sidecar.errors import InvalidInputError
from sidecar.v1 import inference_pb2 as pb

Request = TypeVar("Request")


@dataclass(frozen=True)
class Undecodable:
    """A request message protobuf could not parse: a string field that is not valid UTF-8
    (proto3 requires it), or a corrupt wire format. gRPC itself would answer UNKNOWN."""

    reason: str  # protobuf's own words, naming the message type
    model = ""  # read by telemetry, as a request's model field

    def error(self) -> InvalidInputError:
        """The caller's mistake, said so."""
        return InvalidInputError(
            f"the request could not be parsed ({self.reason}): string fields must be valid "
            "UTF-8 (proto3); send messages built by code generated from proto/sidecar/v1"
        )


def lenient(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """A request deserializer that returns an Undecodable instead of raising."""
    assert parse is not None

    def parsed(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError as exc:
            return Undecodable(str(exc))

    return parsed


def checked(request: Request | Undecodable) -> Request:
    """The request, or INVALID_ARGUMENT when it could not be parsed."""
    if isinstance(request, Undecodable):
        raise request.error()
    return request


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
    """ExtractEntitiesRequest; an aggregation value this contract does not define is refused
    (proto3 enums are open: a newer client's value must not be read as the default)."""
    aggregation = AGGREGATIONS.get(request.aggregation)
    if aggregation is None:
        known = ", ".join(
            f"{pb.AggregationStrategy.Name(value)} ({value})" for value in AGGREGATIONS if value
        )
        raise InvalidInputError(
            f"aggregation {request.aggregation} is not an AggregationStrategy value: use one of "
            f"{known}, or leave it unset for SIMPLE"
        )
    return ExtractEntitiesRequest(
        model=request.model,
        inputs=list(request.inputs),
        aggregation=aggregation,
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
        response_format=response_format(request),
    )


def response_format(request: pb.GenerateRequest) -> ResponseFormat | None:
    """The request's format; None when unset (free text)."""
    if not request.HasField("response_format"):
        return None
    fmt = request.response_format
    field = fmt.WhichOneof("format")
    if field is None:
        raise InvalidInputError(
            "response_format is set but empty: set one of json_schema, json_object, regex, "
            "choice or lark_grammar"
        )
    kind = FormatKind(field)
    if kind is FormatKind.CHOICE:
        return ResponseFormat(kind, choices=tuple(fmt.choice.values))
    if kind is FormatKind.JSON_OBJECT:
        return ResponseFormat(kind)
    return ResponseFormat(kind, str(getattr(fmt, field)))
