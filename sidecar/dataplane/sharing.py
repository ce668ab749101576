"""Identical inputs once: each row is taken from the result cache, from an identical input
already in flight, or computed by the model's engine, and only the last costs a forward pass.

A call's inputs are tokenized first, so each has its key (result_cache.row_key: the model,
its manifest digest, its task and the ids it sees). The inputs no one is computing go to
the engine together as one *flight*, a task of its own that no caller owns: it lives while
any call waits on one of its rows, so the call that started it may be cancelled or run out
of time and the others still get their answer; when the last of them leaves it is
cancelled, and the batcher drops its inputs before they cost a forward pass. A failure of
the flight itself (the forward pass, a full queue, the model stopping) is every waiter's.
A call's own deadline bounds only its own wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from sidecar.batching.batcher import JobOutput, Work
from sidecar.dataplane.result_cache import ResultCache, Row, RowKey, row_key
from sidecar.errors import DeadlineExceededError, ModelNotReadyError, OverloadedError
from sidecar.serving.served import ServedModel
from sidecar.tasks.base import Prepared
from sidecar.tasks.tokenization import EncodedText
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Stamps

Job = JobOutput[EncodedText]


def _queued_deadline() -> DeadlineExceededError:
    return DeadlineExceededError(
        "the call's deadline passed while queued, before the model ran; allow a longer deadline"
    )


@dataclass(eq=False)
class _Flight:
    """Inputs on their way through the engine for whichever calls wait on their rows."""

    keys: Sequence[RowKey]
    done: asyncio.Future[Job] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    task: asyncio.Task[None] | None = None
    waiters: int = 0  # calls waiting on at least one of its rows


@dataclass
class _Plan:
    """Where a call's rows come from: found in the cache, or (call row, flight row) pairs."""

    rows: list[Row | None]  # filled from the cache now, from flights once they land
    waits: dict[_Flight, list[tuple[int, int]]] = field(default_factory=dict)  # others'
    own: list[tuple[int, int]] = field(default_factory=list)  # rows of the call's own flight
    new: dict[RowKey, int] = field(default_factory=dict)  # its inputs no one computes yet
    new_items: list[EncodedText] = field(default_factory=list)


@dataclass(frozen=True)
class Encoded:
    """A call's inputs tokenized, and when (wall-clock ns) and for how long (µs)."""

    items: Sequence[EncodedText]
    tokenize_us: int
    began_ns: int
    ended_ns: int


class RowSharing:
    """The rows of encoder calls, each computed once while in flight and, with a cache, once
    while remembered. Used on the event loop only."""

    def __init__(
        self,
        metrics: Metrics,
        prepare_pool: Executor,
        max_queue_size: int,
        cache_bytes: int = 0,
    ) -> None:
        self._metrics = metrics
        self._prepare_pool = prepare_pool
        self._max_queue_size = max_queue_size
        self.cache = ResultCache(cache_bytes) if cache_bytes else None
        self._flying: dict[RowKey, tuple[_Flight, int]] = {}  # key -> flight, row in it
        if self.cache is not None:
            cache = self.cache
            metrics.result_cache_bytes(lambda: cache.bytes)

    @property
    def in_flight(self) -> int:
        """Distinct inputs being computed now."""
        return len(self._flying)

    async def encode(
        self, model: ServedModel, prepared: Prepared, deadline: float | None
    ) -> Encoded:
        """Tokenize a call's inputs on the tokenizing pool, refused at once when the model's
        queue is full (inputs being tokenized count as queued, as the batcher counts them)."""
        engine = model.engine
        if engine is None:  # pragma: no cover - every served model has one
            raise ModelNotReadyError(f"model {model.name!r} is not running")
        count = prepared.count
        depth = engine.depth  # inputs being tokenized here count: engine.upstream
        if depth + count > self._max_queue_size:
            raise OverloadedError(
                f"model {model.name!r} has {depth} inputs queued; {count} more would pass "
                f"max_queue_size {self._max_queue_size}: retry with backoff, or add "
                "sidecar replicas"
            )
        if deadline is not None and time.monotonic() >= deadline:
            raise _queued_deadline()
        engine.upstream += count
        began, wall = time.perf_counter_ns(), time.time_ns()
        try:
            async with asyncio.timeout_at(deadline):
                items = await asyncio.get_running_loop().run_in_executor(
                    self._prepare_pool, prepared.encode
                )
        except TimeoutError:
            raise _queued_deadline() from None
        finally:
            engine.upstream -= count
        return Encoded(items, (time.perf_counter_ns() - began) // 1000, wall, time.time_ns())

    async def rows(self, model: ServedModel, encoded: Encoded, deadline: float | None) -> Job:
        """The call's rows in input order, with where its time went: queue, inference and
        batch size are those of the forward passes its rows came from (zero for the cache)."""
        plan = self._plan(model, encoded.items)
        waits = plan.waits
        if plan.new_items:
            waits[self._launch(model, list(plan.new), plan.new_items)] = plan.own
        jobs = await self._wait(list(waits), deadline) if waits else []
        rows = plan.rows
        for places, job in zip(waits.values(), jobs, strict=True):
            for i, j in places:
                rows[i] = job.rows[j]
        filled = [row for row in rows if row is not None]
        assert len(filled) == len(rows)  # every row came from the cache or a flight
        return _timed(encoded, np.stack(filled), jobs)

    def _plan(self, model: ServedModel, items: Sequence[EncodedText]) -> _Plan:
        """Where each of a call's rows will come from, counted in the metrics."""
        plan = _Plan([None] * len(items))
        hits = misses = shared = 0
        cache = self.cache
        for i, item in enumerate(items):
            key = row_key(model.name, model.manifest.digest, model.task.value, item)
            if cache is not None:
                if (row := cache.get(key)) is not None:
                    plan.rows[i] = row
                    hits += 1
                    continue
                misses += 1
            if (flying := self._flying.get(key)) is not None:
                plan.waits.setdefault(flying[0], []).append((i, flying[1]))
                shared += 1
            elif key in plan.new:  # the same input earlier in this call
                plan.own.append((i, plan.new[key]))
                shared += 1
            else:
                plan.new[key] = len(plan.new_items)
                plan.new_items.append(item)
                plan.own.append((i, plan.new[key]))
        if cache is not None:
            self._metrics.looked_up(model.name, hits, misses)
        if shared:
            self._metrics.shared(model.name, shared)
        return plan

    def _launch(
        self, model: ServedModel, keys: Sequence[RowKey], items: Sequence[EncodedText]
    ) -> _Flight:
        flight = _Flight(keys)
        for j, key in enumerate(keys):
            self._flying[key] = (flight, j)
        flight.task = asyncio.create_task(self._fly(model, flight, items))
        flight.task.add_done_callback(lambda _: self._landed(flight, model.name))
        return flight

    async def _fly(self, model: ServedModel, flight: _Flight, items: Sequence[EncodedText]) -> None:
        """Run a flight's inputs through the engine; its deadline is its waiters' own."""
        assert model.engine is not None
        try:
            job = await model.engine.submit(Work(len(items), lambda: items, None, items))
        except Exception as exc:  # the forward pass, the queue or the model: shared
            if not flight.done.done():
                flight.done.set_exception(exc)
        else:
            if self.cache is not None:
                for key, row in zip(flight.keys, job.rows, strict=True):
                    self.cache.put(key, row)
            if not flight.done.done():
                flight.done.set_result(job)
        finally:
            self._unlist(flight)

    def _landed(self, flight: _Flight, name: str) -> None:
        """A flight's task ended: nobody may join it, and nobody waits on it for ever."""
        self._unlist(flight)
        if not flight.done.done():  # cancelled by something else than its waiters leaving
            flight.done.set_exception(
                ModelNotReadyError(f"model {name!r} stopped before the call ran; retry")
            )

    def _unlist(self, flight: _Flight) -> None:
        for key in flight.keys:
            if self._flying.get(key, (None, 0))[0] is flight:
                del self._flying[key]

    async def _wait(self, flights: list[_Flight], deadline: float | None) -> list[Job]:
        """Wait for the flights a call needs, within its own deadline."""
        for flight in flights:
            flight.waiters += 1
        try:
            async with asyncio.timeout_at(deadline):
                # asyncio.wait never cancels what it waits on: leaving is handled below.
                await asyncio.wait([f.done for f in flights], return_when=asyncio.FIRST_EXCEPTION)
            # A failed flight ends the wait with others still pending: raise its error.
            for flight in flights:
                if flight.done.done() and (exc := flight.done.exception()) is not None:
                    raise exc
            return [f.done.result() for f in flights]
        except TimeoutError:
            raise DeadlineExceededError(
                "the call's deadline passed before its forward pass ended (while queued or "
                "running); allow a longer deadline"
            ) from None
        finally:
            for flight in flights:
                flight.waiters -= 1
                if flight.waiters:
                    continue
                if flight.done.done():
                    if not flight.done.cancelled():
                        flight.done.exception()  # retrieved: a failure nobody read is no bug
                else:  # the last caller left: drop its inputs before they cost a pass
                    self._unlist(flight)
                    flight.done.cancel()
                    if flight.task is not None:
                        flight.task.cancel()


def _timed(encoded: Encoded, rows: Row, jobs: list[Job]) -> Job:
    """A call's JobOutput: its own tokenization, and of the forward passes its rows came
    from, the longest wait from its inputs being ready to a pass starting, the longest
    pass and the largest batch; a call answered from the cache alone ran none."""
    ready = encoded.ended_ns
    queue_ns = inference_us = postprocess_us = batch_size = padded = 0
    inference_end = ready
    batch = None
    for job in jobs:
        stamps = job.stamps
        queue_ns = max(queue_ns, stamps.started - ready)
        inference_us = max(inference_us, job.inference_us)
        postprocess_us = max(postprocess_us, job.postprocess_us)
        inference_end = max(inference_end, stamps.inference_end)
        if job.batch_size >= batch_size:
            batch_size, padded, batch = job.batch_size, stamps.padded_tokens, stamps.batch
    return JobOutput(
        inputs=encoded.items,
        rows=rows,
        queue_us=queue_ns // 1000,
        tokenize_us=encoded.tokenize_us,
        inference_us=inference_us,
        postprocess_us=postprocess_us,
        batch_size=batch_size,
        stamps=Stamps(
            tokenize=(encoded.began_ns, ready),
            enqueued=ready,
            started=ready + queue_ns,
            inference_end=max(inference_end, ready + queue_ns),
            input_tokens=sum(item.length for item in encoded.items),
            padded_tokens=padded,
            batch=batch,
        ),
    )
