"""The dataplane: validate, route to a model, run off the event loop, honour deadlines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from sidecar.config import Settings
from sidecar.dataplane.admission import Admission
from sidecar.dataplane.registry import ModelRegistry
from sidecar.dataplane.validation import check_inputs, check_non_negative
from sidecar.domain import (
    CallInfo,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    TokenizeRequest,
    TokenizeResult,
)
from sidecar.errors import DeadlineExceededError
from sidecar.models.manifest import Task

R = TypeVar("R", EmbedResult, ClassifyResult, TokenizeResult)


def _expired() -> DeadlineExceededError:
    return DeadlineExceededError(
        "the call's deadline passed before the model ran; allow a longer deadline"
    )


class DataPlane:
    """Everything a servicer needs, in domain types. Deadlines are time.monotonic() values."""

    def __init__(self, settings: Settings, registry: ModelRegistry, executor: Executor) -> None:
        self.settings = settings
        self.registry = registry
        self.admission = Admission()
        self._executor = executor

    async def _run(self, work: Callable[[], R], deadline: float | None) -> R:
        """Run blocking model work on the executor; drop it if the deadline passes first."""
        if deadline is not None and time.monotonic() >= deadline:
            raise _expired()
        submitted = time.monotonic()
        started: list[float] = []

        def timed() -> R:
            started.append(time.monotonic())
            # Waited out its deadline in the executor queue: skip the forward pass.
            if deadline is not None and started[0] >= deadline:
                raise _expired()
            return work()

        future = asyncio.get_running_loop().run_in_executor(self._executor, timed)
        try:
            if deadline is None:
                result = await future
            else:
                result = await asyncio.wait_for(future, max(deadline - time.monotonic(), 0))
        except TimeoutError:
            raise DeadlineExceededError(
                "the call's deadline passed while the model ran; allow a longer deadline"
            ) from None
        info: CallInfo = result.info
        info.queue_us = int((started[0] - submitted) * 1e6)
        return result

    async def embed(self, request: EmbedRequest, deadline: float | None = None) -> EmbedResult:
        """Embeddings for a batch of texts."""
        check_inputs(request.inputs, self.settings.max_client_batch_size)
        model = self.registry.resolve(request.model, Task.EMBED, "Embed")
        return await self._run(
            lambda: model.embed(request.inputs, request.normalize, request.truncate), deadline
        )

    async def classify(
        self, request: ClassifyRequest, deadline: float | None = None
    ) -> ClassifyResult:
        """Label probabilities for a batch of texts."""
        check_inputs(request.inputs, self.settings.max_client_batch_size)
        check_non_negative("top_k", request.top_k)
        model = self.registry.resolve(request.model, Task.CLASSIFY, "Classify")
        return await self._run(
            lambda: model.classify(request.inputs, request.top_k, request.truncate), deadline
        )

    async def tokenize(
        self, request: TokenizeRequest, deadline: float | None = None
    ) -> TokenizeResult:
        """The model's tokens for a batch of texts (any task)."""
        check_inputs(request.inputs, self.settings.max_client_batch_size)
        model = self.registry.resolve(request.model)
        return await self._run(
            lambda: model.tokenize(request.inputs, request.add_special_tokens, request.truncate),
            deadline,
        )
