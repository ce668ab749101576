"""Generate calls: admission, prompt preparation, and the stream of chunks per step."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Executor
from contextlib import AbstractContextManager

from sidecar.config import Settings
from sidecar.dataplane.admission import InFlightLimit
from sidecar.domain import FinishReason, GenerateChunk, GenerateRequest, Usage
from sidecar.errors import DeadlineExceededError, ModelNotReadyError
from sidecar.generation import sampling
from sidecar.generation.formats import Constraint
from sidecar.generation.scheduler import DecodeScheduler
from sidecar.generation.sequence import Prompt, Sequence
from sidecar.serving.generative import GenerativeModel
from sidecar.telemetry.observer import GenerationSpans, Telemetry

# Answers a generation may hold ready beyond the one its caller is taking (see _Steps).
LOOKAHEAD = 2


class Generation:
    """One Generate call: iterate `chunks()`; `cancelled()` ends it early with a last chunk."""

    def __init__(
        self,
        model: GenerativeModel,
        request: GenerateRequest,
        scheduler: DecodeScheduler,
        prepare_pool: Executor,
        deadline: float | None,
        admit: Callable[[], AbstractContextManager[None]],
        telemetry: Telemetry,
    ) -> None:
        self.model = model
        self._telemetry = telemetry
        self._admit = admit
        self.params = sampling.resolve(request, model.defaults)
        self._request = request
        self._scheduler = scheduler
        self._prepare_pool = prepare_pool
        self._deadline = deadline
        self._sequence: Sequence | None = None
        self._tokenize_us = 0
        self._submitted_ns = 0
        self._sent = 0  # tokens handed to the caller
        # The finish the caller was given; the sequence's own may be a step further on,
        # decoded ahead (LOOKAHEAD) and never taken.
        self._finish: FinishReason | None = None
        self._wall = [0, 0]
        self._last_ns: int | None = None
        self._ttft_s = 0.0

    async def chunks(self) -> AsyncGenerator[GenerateChunk, None]:
        """A chunk per decode step; the last one carries finish, usage and metadata."""
        try:
            with self._admit():
                async with asyncio.timeout_at(self._deadline):
                    # aclosing: a caller that leaves cancels the pending step at once.
                    async with contextlib.aclosing(self._steps()) as steps:
                        async for chunk in steps:
                            yield chunk
        except TimeoutError:
            raise DeadlineExceededError(
                f"the call's deadline passed after {self._sent} generated tokens; allow a longer "
                "deadline or lower max_new_tokens"
            ) from None

    async def _steps(self) -> AsyncGenerator[GenerateChunk, None]:
        t0, began_wall = time.perf_counter_ns(), time.time_ns()
        prompt, constraint = await asyncio.get_running_loop().run_in_executor(
            self._prepare_pool, self._prepare
        )
        self._submitted_ns = time.perf_counter_ns()
        self._tokenize_us = (self._submitted_ns - t0) // 1000
        self._wall = [began_wall, time.time_ns()]  # call start, tokenized
        sequence = self._sequence = self.model.sequence(prompt, self.params, constraint)
        steps = _Steps(self._scheduler, sequence)
        try:
            while True:
                chunk = await steps.next()
                # Timed as it arrived, counted once taken: answers decoded ahead for a caller
                # who then leaves are in neither the latency histograms nor the usage.
                self._tick(t0, steps.arrived_ns)
                if chunk.finish is not None:
                    self._finish = chunk.finish
                    yield self._last(chunk)
                    return
                # Counted as it is handed over: a transport that wrote it may not resume this
                # generator before the caller's cancel ends it.
                self._sent += len(chunk.token_ids)
                yield chunk
        finally:
            steps.close()  # a caller that leaves costs at most the step already running
            self._report()

    def _prepare(self) -> tuple[Prompt, Constraint | None]:
        """On the tokenizing pool: the prompt fitted to the context, the format compiled."""
        prompt = self.model.prompt(self._request, self.params.max_new_tokens)
        return prompt, self.model.constraint(self._request)

    def _tick(self, began_ns: int, now: int) -> None:
        """A step's chunk arrived at `now`: time to first token, or the gap since the last."""
        metrics, name = self._telemetry.metrics, self.model.name
        if self._last_ns is None:
            self._ttft_s = (now - began_ns) / 1e9
            metrics.first_token(name, self._ttft_s)
        else:
            metrics.inter_token(name, (now - self._last_ns) / 1e9)
        self._last_ns = now

    def _report(self) -> None:
        """Tokens counted, and (when traced) the call's attributes and child spans."""
        sequence = self._sequence
        if sequence is None:
            return
        began, tokenized = self._wall
        self._telemetry.generation(
            self.model.call_info(),
            [self._request.prompt] if self._request.prompt else [],
            GenerationSpans(
                input_tokens=len(sequence.prompt.ids),
                # What the caller was sent: a step decoded ahead and never taken is not output.
                output_tokens=len(sequence.generated) if self._finish else self._sent,
                finish=self._finish.value if self._finish else "cancelled",
                ttft_s=self._ttft_s,
                truncated=sequence.prompt.truncated_tokens > 0,
                batch_size=sequence.batch_size,
                began_ns=began,
                tokenized_ns=tokenized,
                started_ns=tokenized + max(0, sequence.started_ns - self._submitted_ns),
                ended_ns=time.time_ns(),
            ),
        )

    def _last(self, chunk: GenerateChunk, completion_tokens: int | None = None) -> GenerateChunk:
        """The chunk with usage and call metadata attached."""
        sequence = self._sequence
        assert sequence is not None
        info = self.model.call_info()
        info.tokenize_us = self._tokenize_us
        if sequence.started_ns:
            info.queue_us = max(0, (sequence.started_ns - self._submitted_ns) // 1000)
        info.inference_us = sequence.inference_us
        info.batch_size = sequence.batch_size
        usage = Usage(
            prompt_tokens=len(sequence.prompt.ids),
            completion_tokens=(
                len(sequence.generated) if completion_tokens is None else completion_tokens
            ),
            truncated_prompt_tokens=sequence.prompt.truncated_tokens,
        )
        return GenerateChunk(chunk.text, chunk.token_ids, chunk.finish, usage, info)

    def cancelled(self) -> GenerateChunk:
        """The last chunk of a generation stopped by its caller (no new tokens)."""
        if self._sequence is None:
            return GenerateChunk(
                "", [], FinishReason.CANCELLED, Usage(0, 0), self.model.call_info()
            )
        # A step may have finished after the cancel: its token was never sent, so not counted.
        return self._last(GenerateChunk("", [], FinishReason.CANCELLED), self._sent)


class _Steps:
    """One sequence's decode steps, each asked for as the last one's answer arrives.

    Not when the caller has taken the answer: a transport still writing the last answers
    (Stream writes every item's on one call) would otherwise ask late and miss the step the
    other generations share. At most LOOKAHEAD answers wait for the caller; past that the
    steps pause until it takes one, so a slow reader still holds decoding back.
    """

    def __init__(self, scheduler: DecodeScheduler, sequence: Sequence) -> None:
        self._scheduler = scheduler
        self._sequence = sequence
        # Answers in, not yet taken, each with when it arrived (perf_counter ns).
        self._ready: deque[tuple[GenerateChunk, int]] = deque()
        self.arrived_ns = 0  # when the answer `next` returned last arrived
        self._arrived = asyncio.Event()
        self._failure: BaseException | None = None
        self._pending: asyncio.Future[GenerateChunk] | None = None
        # A step asked for whose answer is not in yet (its future may be done, its callback
        # not yet run: asking again then would put the sequence in two steps at once).
        self._asked = False
        self._ended = False  # the last answer in is the sequence's last
        self._closed = False
        self._ask()

    def _ask(self) -> None:
        try:
            self._pending = self._scheduler.submit(self._sequence)
        except Exception as exc:  # a model shutting down
            self._fail(exc)
            return
        self._asked = True
        self._pending.add_done_callback(self._land)

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._arrived.set()

    def _land(self, future: asyncio.Future[GenerateChunk]) -> None:
        self._asked = False
        if future.cancelled():
            if not self._closed:  # withdrawn by someone else than close(): the step is gone
                self._fail(ModelNotReadyError("the decode step was withdrawn; retry the call"))
            return
        if self._closed:
            return
        if (exc := future.exception()) is not None:
            self._fail(exc)
            return
        chunk = future.result()
        self._ready.append((chunk, time.perf_counter_ns()))
        self._ended = chunk.finish is not None
        self._arrived.set()
        if not self._ended and len(self._ready) < LOOKAHEAD:
            self._ask()

    async def next(self) -> GenerateChunk:
        """The next answer, in order; raises the step's error once the answers before it."""
        while not self._ready:
            if self._failure is not None:
                raise self._failure
            self._arrived.clear()
            await self._arrived.wait()
        chunk, self.arrived_ns = self._ready.popleft()
        if not (self._asked or self._ended or self._failure is not None):
            self._ask()  # the steps paused for the caller
        return chunk

    def close(self) -> None:
        """Withdraw the step asked for; answers that arrive after are dropped."""
        self._closed = True
        if self._pending is not None:
            self._pending.cancel()


class Generations:
    """Generate calls started, against the bound on generations at once."""

    def __init__(self, settings: Settings, prepare_pool: Executor, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self._prepare_pool = prepare_pool
        self._limit = InFlightLimit(
            settings.max_concurrent_generations, "generations", "max_concurrent_generations"
        )

    @property
    def running(self) -> int:
        """Generations in progress."""
        return self._limit.running

    def start(
        self, model: GenerativeModel, request: GenerateRequest, deadline: float | None
    ) -> Generation:
        """A Generation ready to iterate (parameters already checked)."""
        if model.engine is None:  # pragma: no cover - every served model has one
            raise ModelNotReadyError(f"model {model.name!r} is not running")
        return Generation(
            model,
            request,
            model.engine,
            self._prepare_pool,
            deadline,
            self._limit.held,
            self._telemetry,
        )
