"""Generate calls: admission, prompt preparation, and the stream of chunks per step."""

from __future__ import annotations

import asyncio
import contextlib
import time
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
            made = len(self._sequence.generated) if self._sequence else 0
            raise DeadlineExceededError(
                f"the call's deadline passed after {made} generated tokens; allow a longer "
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
        future = self._scheduler.submit(sequence)
        try:
            while True:
                chunk = await future
                self._tick(t0)
                if chunk.finish is not None:
                    yield self._last(chunk)
                    return
                # The next step runs while this chunk is written to the caller.
                future = self._scheduler.submit(sequence)
                self._sent += len(chunk.token_ids)
                yield chunk
        finally:
            future.cancel()  # a caller that leaves costs at most the step already running
            self._report()

    def _prepare(self) -> tuple[Prompt, Constraint | None]:
        """On the tokenizing pool: the prompt fitted to the context, the format compiled."""
        prompt = self.model.prompt(self._request, self.params.max_new_tokens)
        return prompt, self.model.constraint(self._request)

    def _tick(self, began_ns: int) -> None:
        """A step's chunk arrived: time to first token, or the gap since the last one."""
        now = time.perf_counter_ns()
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
                output_tokens=len(sequence.generated),
                finish=sequence.finish.value if sequence.finish else "cancelled",
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
