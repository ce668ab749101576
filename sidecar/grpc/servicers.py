"""Thin servicers: convert, call the dataplane, convert back. No logic of their own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import Message

from sidecar.dataplane.service import DataPlane
from sidecar.grpc import routes, to_domain, to_proto
from sidecar.grpc.envelope import RERAISE, answered, grpc_calls
from sidecar.grpc.status import fail
from sidecar.grpc.stream import run_stream
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc, models_pb2, models_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _unary(route: routes.Route) -> Callable[..., Awaitable[Message | None]]:
    async def method(self: InferenceServicer, request: Message, context: Context) -> Any:
        dataplane = self._dataplane
        deadline = to_domain.deadline(context)
        return await answered(
            self._calls,
            route.rpc,
            request,
            context,
            lambda checked: routes.serve(route, dataplane, checked, deadline),
        )

    method.__name__ = route.rpc
    method.__qualname__ = f"InferenceServicer.{route.rpc}"
    method.__doc__ = f"{route.rpc}, along its route."
    return method


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """sidecar.v1.Inference: the unary calls come from the route table (set below)."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane
        self._calls = grpc_calls(dataplane)

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Tokens as they are generated; the last message says why generation ended."""
        try:
            async with self._calls.call("Generate", request.model) as call:
                generation = self._dataplane.generate(
                    to_domain.generate(to_domain.checked(request)), to_domain.deadline(context)
                )
                call.model = generation.model.name
                # aclosing: a departed caller stops decoding now, not at garbage collection.
                async with contextlib.aclosing(generation.chunks()) as chunks:
                    async for chunk in chunks:
                        yield to_proto.generate(chunk)
        except RERAISE:
            raise
        except BaseException as exc:  # a tokenizer's Rust panic is a BaseException
            fail(context, exc)

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
            self._calls,
        )
        try:
            # aclosing: a departed client cancels in-flight items now, not at garbage collection.
            async with (
                self._calls.call("Stream", "", counted=False),
                contextlib.aclosing(responses),
            ):
                async for response in responses:
                    yield response
        except RERAISE:
            raise
        except BaseException as exc:
            fail(context, exc)


for _route in routes.UNARY:
    setattr(InferenceServicer, _route.rpc, _unary(_route))


class ModelsServicer(models_pb2_grpc.ModelsServicer):
    """sidecar.v1.Models."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._registry = dataplane.registry
        self._calls = grpc_calls(dataplane)

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        """Every configured model."""

        async def work(_: models_pb2.ListModelsRequest) -> models_pb2.ListModelsResponse:
            return models_pb2.ListModelsResponse(
                models=[to_proto.model_info(status) for status in self._registry],
                default_model=self._registry.default_name,
            )

        answer = await answered(self._calls, "ListModels", request, context, work)
        return answer  # type: ignore[return-value]  # None once the status is set

    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: Context
    ) -> models_pb2.GetModelResponse:
        """One model by name."""

        async def work(checked: models_pb2.GetModelRequest) -> models_pb2.GetModelResponse:
            status = self._registry.status(checked.model)
            return models_pb2.GetModelResponse(model=to_proto.model_info(status))

        answer = await answered(self._calls, "GetModel", request, context, work)
        return answer  # type: ignore[return-value]  # None once the status is set


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
    # The unary methods are set from the route table, where mypy cannot see them.
    servicer = InferenceServicer(dataplane)  # type: ignore[abstract]
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, collected)
    models_pb2_grpc.add_ModelsServicer_to_server(ModelsServicer(dataplane), collected)
    for service, handlers in collected.services.items():
        lenient = {name: _lenient(handler) for name, handler in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, lenient),))
        server.add_registered_method_handlers(service, lenient)
