"""Thin servicers: convert, call the dataplane, convert back. No logic of their own."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from sidecar.dataplane.service import DataPlane
from sidecar.errors import PROPAGATE
from sidecar.grpc import to_domain, to_proto
from sidecar.grpc.status import fail, translates_errors
from sidecar.grpc.stream import run_stream
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc, models_pb2, models_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """sidecar.v1.Inference."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane
        self.admission = dataplane.admission
        self.max_message_bytes = dataplane.settings.max_message_bytes
        self.telemetry = dataplane.telemetry

    @translates_errors
    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        """Embeddings for each input."""
        result = await self._dataplane.embed(to_domain.embed(request), to_domain.deadline(context))
        return to_proto.embed(result)

    @translates_errors
    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        """Label scores for each input."""
        result = await self._dataplane.classify(
            to_domain.classify(request), to_domain.deadline(context)
        )
        return to_proto.classify(result)

    @translates_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        """Tokens for each input."""
        result = await self._dataplane.tokenize(
            to_domain.tokenize(request), to_domain.deadline(context)
        )
        return to_proto.tokenize(result)

    @translates_errors
    async def ExtractEntities(
        self, request: pb.ExtractEntitiesRequest, context: Context
    ) -> pb.ExtractEntitiesResponse:
        """Entities in each input."""
        result = await self._dataplane.extract_entities(
            to_domain.extract_entities(request), to_domain.deadline(context)
        )
        return to_proto.extract_entities(result)

    @translates_errors
    async def Rerank(self, request: pb.RerankRequest, context: Context) -> pb.RerankResponse:
        """Passages sorted by relevance to the query."""
        result = await self._dataplane.rerank(
            to_domain.rerank(request), to_domain.deadline(context)
        )
        return to_proto.rerank(result)

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Tokens as they are generated; the last message says why generation ended."""
        began, code, model = time.perf_counter(), grpc.StatusCode.OK, request.model
        try:
            async with self.admission.call():
                generation = self._dataplane.generate(
                    to_domain.generate(to_domain.checked(request)), to_domain.deadline(context)
                )
                # aclosing: a departed caller stops decoding now, not at garbage collection.
                model = generation.model.name
                async with contextlib.aclosing(generation.chunks()) as chunks:
                    async for chunk in chunks:
                        yield to_proto.generate(chunk)
        except grpc.aio.AbortError:
            raise
        except PROPAGATE:
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException as exc:  # a tokenizer's Rust panic is a BaseException
            code = fail(context, exc)
        finally:
            self.telemetry.answered("Generate", model, code.name, time.perf_counter() - began)

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: Context
    ) -> AsyncIterator[pb.StreamResponse]:
        """Items answered in completion order; a failed item does not end the stream."""
        settings = self._dataplane.settings
        responses = run_stream(
            self._dataplane,
            request_iterator,
            settings.stream_max_in_flight,
            to_domain.deadline(context),
            settings.max_message_bytes,
        )
        try:
            # aclosing: a departed client cancels in-flight items now, not at garbage collection.
            async with self.admission.call(), contextlib.aclosing(responses):
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise
        except PROPAGATE:
            raise
        except BaseException as exc:
            fail(context, exc)


class ModelsServicer(models_pb2_grpc.ModelsServicer):
    """sidecar.v1.Models."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._registry = dataplane.registry
        self.admission = dataplane.admission
        self.max_message_bytes = dataplane.settings.max_message_bytes
        self.telemetry = dataplane.telemetry

    @translates_errors
    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        """Every configured model."""
        return models_pb2.ListModelsResponse(
            models=[to_proto.model_info(status) for status in self._registry],
            default_model=self._registry.default_name,
        )

    @translates_errors
    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: Context
    ) -> models_pb2.GetModelResponse:
        """One model by name."""
        status = self._registry.status(request.model)
        return models_pb2.GetModelResponse(model=to_proto.model_info(status))


class _Registrations:
    """Stands in for a server to collect what a generated add_*_to_server registers."""

    def __init__(self) -> None:
        self.services: dict[str, Mapping[str, grpc.RpcMethodHandler[Any, Any]]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers arrive by service name below

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.services[service] = handlers


def _lenient(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, with a request deserializer that never raises (see Undecodable)."""
    parse, write = to_domain.lenient(handler.request_deserializer), handler.response_serializer
    streams = (handler.request_streaming, handler.response_streaming)
    make, behaviour = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }[streams]
    assert behaviour is not None
    return make(behaviour, parse, write)


def add_servicers(dataplane: DataPlane, server: grpc.aio.Server) -> None:
    """Register sidecar.v1.Inference and sidecar.v1.Models on `server`.

    As the generated add_*_to_server functions do, except that a request protobuf cannot
    parse (a string field that is not UTF-8) reaches the servicer as an Undecodable and is
    answered INVALID_ARGUMENT: gRPC would answer UNKNOWN for a deserializer that raises.
    """
    collected: Any = _Registrations()
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(dataplane), collected)
    models_pb2_grpc.add_ModelsServicer_to_server(ModelsServicer(dataplane), collected)
    for service, handlers in collected.services.items():
        lenient = {name: _lenient(handler) for name, handler in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, lenient),))
        server.add_registered_method_handlers(service, lenient)
