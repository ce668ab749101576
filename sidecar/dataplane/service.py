"""The dataplane: check a request, resolve its model, hand the work to the model's engine."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Any

from sidecar.config import Settings
from sidecar.dataplane.admission import Admission, InFlightLimit
from sidecar.dataplane.generation import Generation, Generations
from sidecar.dataplane.registry import ModelRegistry
from sidecar.dataplane.sharing import RowSharing
from sidecar.domain import GenerateRequest, TokenizeRequest, TokenizeResult
from sidecar.errors import DeadlineExceededError
from sidecar.serving.engines import Engines
from sidecar.serving.generative import GenerativeModel
from sidecar.serving.served import ServedModel
from sidecar.tasks import registry
from sidecar.tasks.base import InputLimits
from sidecar.tasks.checks import check_inputs
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.observer import Telemetry


class DataPlane:
    """Everything a transport needs, in domain types. Deadlines are time.monotonic() values.

    Encoder calls go through their model's engine (its batcher), generations through its
    decode scheduler; `prepare_pool` tokenizes what no engine queues (Tokenize, prompts).
    """

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        engines: Engines,
        prepare_pool: Executor,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry or Telemetry(Metrics(), None, log_inputs=settings.log_inputs)
        self.registry = registry
        self.engines = engines
        self.admission = Admission()
        self._prepare_pool = prepare_pool
        self.input_limits = InputLimits(
            max_inputs=settings.max_client_batch_size,
            max_passages=settings.max_rerank_passages,
            max_rows=settings.max_queue_size,
        )
        # Unary calls and Stream items in progress.
        self._requests = InFlightLimit(
            settings.max_concurrent_requests, "requests", "max_concurrent_requests"
        )
        # Every encoder call's rows: identical inputs computed once, and the result cache.
        self.rows = RowSharing(
            self.telemetry.metrics,
            prepare_pool,
            settings.max_queue_size,
            settings.result_cache_bytes,
        )
        self.generations = Generations(settings, prepare_pool, self.telemetry)
        self.telemetry.metrics.generations(lambda: self.generations.running)

    async def run(self, request: Any, deadline: float | None = None) -> Any:
        """Answer any encoder task's request (Embed, Classify, ExtractEntities, Rerank).

        The request's kind is checked, a model that answers it is resolved, and the
        model's task prepares the call, reduces the forward pass and finishes the answer.
        Each input's row comes from the result cache, an identical input in flight or the
        model's engine (sharing.RowSharing).
        """
        kind = registry.kind_of(request)
        kind.check(request, self.input_limits)
        model = self.registry.resolve(request.model, kind.tasks, kind.rpc)
        assert isinstance(model, ServedModel)  # the registry checked the task
        prepared = model.handler.prepare(model, request, self.input_limits)
        with self._requests.held():
            encoded = await self.rows.encode(model, prepared, deadline)
            job = await self.rows.rows(model, encoded, deadline)
        result = model.answer(job, request, prepared)
        self.telemetry.batched(job.stamps, result.info, job.inputs, prepared.described)
        return result

    async def tokenize(
        self, request: TokenizeRequest, deadline: float | None = None
    ) -> TokenizeResult:
        """The model's tokens for a batch of texts (any task); no forward pass, no queue."""
        check_inputs(request.inputs, self.settings.max_client_batch_size)
        model = self.registry.resolve(request.model)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceededError("the call's deadline passed before it started")
        with self._requests.held():
            work = asyncio.get_running_loop().run_in_executor(
                self._prepare_pool,
                lambda: model.tokenize(
                    request.inputs,
                    add_special_tokens=request.add_special_tokens,
                    truncate=request.truncate,
                ),
            )
            try:
                async with asyncio.timeout_at(deadline):
                    return await work
            except TimeoutError:
                raise DeadlineExceededError(
                    "the call's deadline passed while tokenizing; allow a longer deadline"
                ) from None

    def generate(self, request: GenerateRequest, deadline: float | None = None) -> Generation:
        """A generation to iterate; bad parameters and a wrong model are refused here."""
        kind = registry.GENERATE
        model = self.registry.resolve(request.model, kind.tasks, kind.rpc)
        assert isinstance(model, GenerativeModel)
        return self.generations.start(model, request, deadline)

    async def close(self) -> None:
        """Stop every model's engine; calls still queued are refused."""
        await self.engines.close()
