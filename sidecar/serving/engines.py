"""Each loaded model's engine, built when it loads: its batcher or its decode scheduler.

Every engine shares the server's inference pool and one budget of its free threads, so
encoder batches and decode steps of all models take turns on the same cores and none
starves another. The dataplane only submits work to a model's engine.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any

from sidecar.batching.batcher import Batcher, BatchLimits
from sidecar.generation.scheduler import DecodeScheduler
from sidecar.runtime.engine import Engine
from sidecar.runtime.threads import Lane, ThreadBudget
from sidecar.serving.generative import GenerativeModel
from sidecar.serving.served import LoadedModel, ServedModel
from sidecar.telemetry.observer import Telemetry


class Engines:
    """Builds engines for loaded models and closes them all at shutdown."""

    def __init__(
        self,
        limits: BatchLimits,
        max_decode_batch_size: int,
        model_pool: Executor,
        prepare_pool: Executor,
        telemetry: Telemetry,
        budget: ThreadBudget | None = None,
    ) -> None:
        """`budget` counts cores when passes adapt (`wide` > 1), else passes (one unit each);
        without one, `limits.workers` passes at once."""
        self._limits = limits
        self._max_decode_batch_size = max_decode_batch_size
        self._model_pool = model_pool
        self._prepare_pool = prepare_pool
        self._telemetry = telemetry
        # One budget of free inference threads for every engine: they share the pool.
        self._slots = budget or ThreadBudget(limits.workers)
        self._built: list[Engine[Any, Any]] = []

    def lanes(self, model: ServedModel) -> tuple[Lane, ...]:
        """How a model's passes may run, narrowest first, in units of the budget."""
        budget = self._slots
        if budget.wide == 1:  # fixed workers: a pass is one unit, on its own thread setting
            return (Lane(1, None),)
        threads = model.backend.intra_op_threads or budget.capacity
        wide = Lane(min(threads, budget.capacity), None)
        half = model.backend.half_threads
        if half and half < wide.units:
            return (Lane(half, half), wide)
        return (wide,)

    def attach(self, model: LoadedModel) -> None:
        """Give a model that just loaded its engine (on the event loop's thread)."""
        if isinstance(model, ServedModel):
            batcher = model.engine = Batcher(
                model.name,
                model.infer,
                self._limits,
                self._model_pool,
                self._prepare_pool,
                self._slots,
                self._telemetry,
                self.lanes(model),
            )
            self._telemetry.metrics.queue_depth(model.name, lambda: batcher.depth)
            self._built.append(batcher)
        elif isinstance(model, GenerativeModel):
            model.engine = DecodeScheduler(
                model.name,
                model.decoder,
                self._model_pool,
                self._slots,
                self._max_decode_batch_size,
            )
            self._built.append(model.engine)

    async def close(self) -> None:
        """Stop every engine; work still waiting is refused with UNAVAILABLE."""
        await asyncio.gather(*(engine.close() for engine in self._built))
