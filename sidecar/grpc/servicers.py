"""Thin servicers: convert, call the dataplane, convert back. No logic of their own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sidecar.dataplane.service import DataPlane
from sidecar.grpc import to_domain, to_proto
from sidecar.grpc.status import abort, status_of, translates_errors
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
                    to_domain.generate(request), to_domain.deadline(context)
                )
                # aclosing: a departed caller stops decoding now, not at garbage collection.
                model = generation.model.name
                async with contextlib.aclosing(generation.chunks()) as chunks:
                    async for chunk in chunks:
                        yield to_proto.generate(chunk)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = status_of(exc)[0]
            await abort(context, exc)
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
        except Exception as exc:
            await abort(context, exc)


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
