"""One model's queue: calls are tokenized as they arrive, queued, and run in shared batches.

A call's inputs are tokenized on their own thread pool while the current batch runs, so
the next batch is ready when the model frees up. Inputs from any number of calls (unary
batches and Stream items alike) wait in one bounded queue; the planner cuts each batch
by a token budget and a count cap, grouping inputs of similar length. A call whose
deadline passes, or whose caller goes away, leaves the queue before it costs a forward
pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from opentelemetry.trace import SpanContext

from sidecar.batching.planner import plan
from sidecar.errors import DeadlineExceededError, ModelNotReadyError, OverloadedError
from sidecar.runtime.threads import Lane, ThreadBudget
from sidecar.telemetry.tracing import Stamps, current_context


@dataclass(frozen=True)
class BatchOutput:
    """One forward pass: a row per input (pooled vector or label probabilities) and its cost."""

    rows: npt.NDArray[np.float32]
    inference_us: int
    postprocess_us: int


log = logging.getLogger(__name__)


class Sized(Protocol):
    """An encoded input: all the batcher needs to know is its token count."""

    @property
    def length(self) -> int:
        """Tokens the model sees for this input."""
        ...


T = TypeVar("T", bound=Sized)


@dataclass(frozen=True)
class Work(Generic[T]):
    """One call's inputs for the batcher: `count` of them, encoded by `prepare` on the
    tokenizing pool, or already `encoded` (then queued at once, with no thread hop)."""

    count: int
    prepare: Callable[[], Sequence[T]]
    deadline: float | None  # time.monotonic()
    encoded: Sequence[T] | None = None


@dataclass(frozen=True)
class BatchLimits:
    """How batches are cut and how much may wait."""

    max_batch_tokens: int  # padded tokens (inputs x longest) in one forward pass
    max_batch_size: int  # inputs in one forward pass
    max_batch_delay_s: float  # longest an input waits for company before its batch starts
    max_queue_size: int  # inputs tokenizing or waiting, per model
    workers: int  # forward passes at once, when the batcher is not given a shared budget


class BatchObserver(Protocol):
    """Told of every forward pass (metrics, the batch span); returns the span's context."""

    def batch(
        self,
        model: str,
        callers: list[SpanContext],
        size: int,
        tokens: int,
        padded_tokens: int,
        start_ns: int,
        end_ns: int,
        error: BaseException | None,
    ) -> SpanContext | None:
        """Record one forward pass."""
        ...


@dataclass(frozen=True)
class JobOutput(Generic[T]):
    """A call's encoded inputs and rows, in input order, and where its time went (µs)."""

    inputs: Sequence[T]
    rows: npt.NDArray[np.float32]
    queue_us: int
    tokenize_us: int
    inference_us: int
    postprocess_us: int
    batch_size: int  # the largest batch any of the call's inputs ran in
    stamps: Stamps


def _deadline_error(*, started: bool) -> DeadlineExceededError:
    where = "while the model ran" if started else "while queued, before the model ran"
    return DeadlineExceededError(f"the call's deadline passed {where}; allow a longer deadline")


def _stopped(name: str) -> ModelNotReadyError:
    return ModelNotReadyError(
        f"model {name!r} stopped before the call ran; retry on another instance"
    )


class _Job:
    """One call's inputs on their way through the queue."""

    def __init__(self, count: int, deadline: float | None) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.rows: list[npt.NDArray[np.float32] | None] = [None] * count
        self.waiting = count
        self.untaken = count  # inputs counted in the queue depth
        self.deadline = deadline
        self.enqueued = 0.0
        self.started: float | None = None
        self.tokenize_us = self.inference_us = self.postprocess_us = self.batch_size = 0
        # For traces: the calling span, wall-clock stamps, and the batch the call ran in.
        self.caller = current_context()
        self.tokenize_ns = (0, 0)
        self.enqueued_ns = self.started_ns = self.inference_end_ns = self.padded_tokens = 0
        self.batch_span: SpanContext | None = None

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def deliver(
        self,
        index: int,
        row: npt.NDArray[np.float32],
        output: BatchOutput,
        size: int,
        padded_tokens: int,
        batch_span: SpanContext | None,
    ) -> None:
        if self.future.done():
            return
        self.rows[index] = row
        self.inference_us = max(self.inference_us, output.inference_us)
        self.postprocess_us = max(self.postprocess_us, output.postprocess_us)
        if size >= self.batch_size:
            self.batch_span = batch_span
        self.batch_size = max(self.batch_size, size)
        self.padded_tokens = max(self.padded_tokens, padded_tokens)
        self.inference_end_ns = max(self.inference_end_ns, time.time_ns())
        self.waiting -= 1
        if not self.waiting:
            self.future.set_result(None)


@dataclass(eq=False)
class _Running(Generic[T]):
    """A batch task's inputs and the budget units it holds until it ends."""

    batch: list[_Queued[T]]
    lane: Lane
    held: bool = True


@dataclass(eq=False)
class _Queued(Generic[T]):
    job: _Job
    index: int
    value: T


# A model whose passes run one way: each takes one unit of the budget, on the backend's own
# thread setting.
ONE_LANE = (Lane(1, None),)


class Batcher(Generic[T]):
    """The queue and batch loop of one model, its Engine. Start lazily; `close()` at shutdown.

    `lanes` are the ways a pass may run, narrowest first. With two (half the threads,
    every thread), a batch that leaves nothing else queued runs wide, for the lowest
    latency, and while more waits each batch runs on half, side by side with the next one.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[list[T], int | None], BatchOutput],
        limits: BatchLimits,
        model_pool: Executor,
        prepare_pool: Executor,
        slots: ThreadBudget | None = None,
        observer: BatchObserver | None = None,
        lanes: Sequence[Lane] = ONE_LANE,
    ) -> None:
        """`slots` counts the threads (or passes) free to run a batch; share one among the
        batchers that share `model_pool`, so a batch is only cut when it can start at once.
        `run(inputs, threads)` runs a pass on the lane's thread count."""
        self.name = name
        self.limits = limits
        self._run_batch = run
        self._model_pool = model_pool
        self._prepare_pool = prepare_pool
        self._pending: list[_Queued[T]] = []  # oldest first
        self._depth = 0
        # Inputs a caller is encoding elsewhere before it submits them: they count in the
        # depth, so the gauge and the choice of lane see them coming.
        self.upstream = 0
        self._arrived = asyncio.Event()
        self._slots = slots or ThreadBudget(limits.workers)
        self._narrow, self._wide = lanes[0], lanes[-1]
        self._running: dict[asyncio.Task[None], _Running[T]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._observer = observer

    @property
    def depth(self) -> int:
        """Inputs tokenizing or waiting for a batch."""
        return self._depth + self.upstream

    async def submit(self, work: Work[T]) -> JobOutput[T]:
        """Tokenize a call's inputs with `work.prepare`, queue them, return their rows."""
        count, prepare, deadline = work.count, work.prepare, work.deadline
        if self._closed:
            raise _stopped(self.name)
        if self._depth + count > self.limits.max_queue_size:
            raise OverloadedError(
                f"model {self.name!r} has {self._depth} inputs queued; {count} more would pass "
                f"max_queue_size {self.limits.max_queue_size}: retry with backoff, or add "
                "sidecar replicas"
            )
        if deadline is not None and time.monotonic() >= deadline:
            raise _deadline_error(started=False)
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._dispatch(), name=f"batcher-{self.name}")
            self._loop_task.add_done_callback(self._loop_ended)
        job = _Job(count, deadline)
        self._depth += count
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                began, wall = time.perf_counter_ns(), time.time_ns()
                if work.encoded is not None:
                    values = work.encoded
                else:
                    values = await loop.run_in_executor(self._prepare_pool, prepare)
                job.tokenize_us = (time.perf_counter_ns() - began) // 1000
                job.enqueued = time.monotonic()
                job.enqueued_ns = time.time_ns()
                job.tokenize_ns = (wall, job.enqueued_ns)
                self._pending.extend(_Queued(job, i, v) for i, v in enumerate(values))
                self._arrived.set()
                await job.future
        except TimeoutError:
            raise _deadline_error(started=job.started is not None) from None
        finally:
            if job.untaken:
                # Ended early (deadline, cancel, bad input): give its places back now.
                self._depth -= job.untaken
                self._pending = [q for q in self._pending if q.job is not job]
            job.future.cancel()  # a batch still running for it drops its rows
        assert job.started is not None
        return JobOutput(
            inputs=values,
            rows=np.stack(job.rows),  # type: ignore[arg-type]  # every row was delivered
            queue_us=int((job.started - job.enqueued) * 1e6),
            tokenize_us=job.tokenize_us,
            inference_us=job.inference_us,
            postprocess_us=job.postprocess_us,
            batch_size=job.batch_size,
            stamps=Stamps(
                tokenize=job.tokenize_ns,
                enqueued=job.enqueued_ns,
                started=job.started_ns,
                inference_end=job.inference_end_ns,
                input_tokens=sum(v.length for v in values),
                padded_tokens=job.padded_tokens,
                batch=job.batch_span,
            ),
        )

    async def _dispatch(self) -> None:
        """Forever: wait for inputs and a free worker, cut a batch, start it."""
        limits = self.limits
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire(self._narrow.units)
            try:
                # Calls may have left (cancel, deadline) while this waited for a worker.
                while (
                    limits.max_batch_delay_s > 0 and 0 < len(self._pending) < limits.max_batch_size
                ):
                    # Wait for company, but never hold the oldest input past the delay.
                    self._arrived.clear()
                    try:
                        async with asyncio.timeout_at(
                            self._pending[0].job.enqueued + limits.max_batch_delay_s
                        ):
                            await self._arrived.wait()
                    except TimeoutError:
                        break
                batch = self._take()
            except BaseException:
                # Closed (or a bug) while holding a unit: a lost unit would stall every engine.
                self._slots.release(self._narrow.units)
                raise
            if not batch:
                self._slots.release(self._narrow.units)
                continue
            lane = self._lane()
            task = asyncio.create_task(self._run(batch, lane))
            self._running[task] = _Running(batch, lane)
            task.add_done_callback(self._batch_ended)

    def _lane(self) -> Lane:
        """Wide when this batch is all there is (nothing queued or tokenizing behind it) and
        the extra threads are free; else narrow, leaving the other threads to the next."""
        extra = self._wide.units - self._narrow.units
        if extra and not self.depth and self._slots.try_acquire(extra):
            return self._wide
        return self._narrow

    def _release(self, task: asyncio.Task[Any] | None) -> None:
        """Give back a batch's units once: as its pass ends, or as its task does (a task
        cancelled before its first step never runs its own finally)."""
        running = self._running.get(task) if task is not None else None
        if running is not None and running.held:
            running.held = False
            self._slots.release(running.lane.units)

    def _batch_ended(self, task: asyncio.Task[None]) -> None:
        self._release(task)
        batch = self._running.pop(task).batch
        if task.cancelled():
            # Cancelled before its first step: its callers are still waiting.
            for queued in batch:
                queued.job.fail(_stopped(self.name))

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A batch loop that died of a bug must not leave callers waiting for ever."""
        self._loop_task = None
        if task.cancelled():
            return
        exc = task.exception()
        log.error("batch loop of model %s failed; restarting it", self.name, exc_info=exc)
        for queued in self._pending:
            queued.job.fail(exc or _stopped(self.name))
        self._pending = []

    def _take(self) -> list[_Queued[T]]:
        """Drop what expired, then remove the next batch from the queue."""
        now = time.monotonic()
        for queued in self._pending:
            job = queued.job
            if job.deadline is not None and job.deadline <= now:
                job.fail(_deadline_error(started=job.started is not None))
        live = [q for q in self._pending if not q.job.future.done()]
        chosen = set(
            plan(
                [q.value.length for q in live],
                self.limits.max_batch_tokens,
                self.limits.max_batch_size,
            )
        )
        batch = [live[i] for i in sorted(chosen)]
        self._pending = [q for i, q in enumerate(live) if i not in chosen]
        for queued in batch:
            queued.job.untaken -= 1
            self._depth -= 1
        return batch

    async def _run(self, batch: list[_Queued[T]], lane: Lane) -> None:
        """Run one batch on the model pool and hand each row to its call."""
        started, started_ns = time.monotonic(), time.time_ns()
        for queued in batch:
            if queued.job.started is None:
                queued.job.started, queued.job.started_ns = started, started_ns
        lengths = [q.value.length for q in batch]
        padded = len(batch) * max(lengths)
        span: SpanContext | None = None
        try:
            output = await asyncio.get_running_loop().run_in_executor(
                self._model_pool, self._run_batch, [q.value for q in batch], lane.threads
            )
        except (Exception, asyncio.CancelledError) as exc:
            self._observe(batch, lengths, padded, started_ns, exc)
            # Every call with an input in this batch learns of the failure.
            for queued in batch:
                queued.job.fail(
                    _stopped(self.name) if isinstance(exc, asyncio.CancelledError) else exc
                )
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            span = self._observe(batch, lengths, padded, started_ns, None)
            if len(output.rows) != len(batch):
                wrong = RuntimeError(
                    f"model {self.name!r} returned {len(output.rows)} rows for {len(batch)} inputs"
                )
                for queued in batch:
                    queued.job.fail(wrong)
            else:
                for row, queued in enumerate(batch):
                    queued.job.deliver(
                        queued.index, output.rows[row], output, len(batch), padded, span
                    )
        finally:
            self._release(asyncio.current_task())

    def _observe(
        self,
        batch: list[_Queued[T]],
        lengths: list[int],
        padded: int,
        started_ns: int,
        error: BaseException | None,
    ) -> SpanContext | None:
        if self._observer is None:
            return None
        callers = list({id(q.job): q.job.caller for q in batch}.values())
        return self._observer.batch(
            self.name, callers, len(batch), sum(lengths), padded, started_ns, time.time_ns(), error
        )

    async def close(self) -> None:
        """Stop the batch loop and fail whatever still waits; later calls are refused."""
        self._closed = True
        tasks = [t for t in (self._loop_task, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for queued in self._pending:
            queued.job.fail(_stopped(self.name))
        self._pending.clear()
