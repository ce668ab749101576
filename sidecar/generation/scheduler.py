"""One model's decode steps: the next token of every waiting generation, in shared runs.

Each generation asks for one step at a time. Steps that wait together run as one batched
decoder step, so a generation that joins mid-way shares the next run instead of waiting
for the others to finish. After a run, the generations it answered ask again before the
next job is cut, so the same company keeps stepping together (its caches stay packed). A new
generation's prefill runs as a job of its own, taking turns with the shared steps: it waits
for at most one step, and the running generations for at most one prefill, however many
arrive at once. Every job holds the full width of the thread budget the encoder batchers
use (`async with slots`), so decode steps and encoder batches take turns on the same cores
and neither starves the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from sidecar.domain import GenerateChunk
from sidecar.errors import PROPAGATE, ModelNotReadyError, SidecarError
from sidecar.generation import formats
from sidecar.generation.sequence import Sequence
from sidecar.runtime.backend import Decoder
from sidecar.runtime.threads import ThreadBudget

log = logging.getLogger(__name__)
# Event-loop turns a job waits at most for the generations of the last one to ask again.
# Generation asks in its answer's done-callback, one turn later; a generation whose caller
# has LOOKAHEAD answers untaken does not ask, and costs the job these few turns.
REGROUP_TURNS = 3


def next_job(fresh: list[bool], *, prefilled_last: bool, max_batch: int) -> tuple[list[int], bool]:
    """Positions (oldest first) of the waiting steps to run next, and whether it is a prefill.

    `fresh[i]` says waiting step i is a prompt's prefill. One prefill runs alone; the steps
    of running generations run together, up to max_batch; the two take turns when both
    wait, so a new prompt waits for at most one shared step and the running generations
    for at most one prefill.
    """
    prefills = [i for i, is_fresh in enumerate(fresh) if is_fresh]
    steps = [i for i, is_fresh in enumerate(fresh) if not is_fresh]
    if prefills and (not steps or not prefilled_last):
        return prefills[:1], True
    return steps[:max_batch], False


class DecodeScheduler:
    """Runs the steps generations ask for, one model's Engine; `close()` at shutdown."""

    def __init__(
        self,
        name: str,
        decoder: Decoder,
        pool: Executor,
        slots: ThreadBudget | asyncio.Semaphore,
        max_batch: int,
    ) -> None:
        self._name = name
        self._decoder = decoder
        self._pool = pool
        self._slots = slots
        self._max_batch = max_batch
        self._waiting: deque[tuple[Sequence, asyncio.Future[GenerateChunk]]] = deque()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._prefilled_last = False
        self._running: list[tuple[Sequence, asyncio.Future[GenerateChunk]]] = []
        self.steps = 0  # sequence steps run (a batched run of n sequences counts n)
        self._masks: ThreadPoolExecutor | None = None  # started by the first constrained job

    @property
    def depth(self) -> int:
        """Steps waiting for a run."""
        return len(self._waiting)

    def submit(self, sequence: Sequence) -> asyncio.Future[GenerateChunk]:
        """The sequence's next chunk (its prefill first). Cancel the future to withdraw."""
        if self._closed:
            raise ModelNotReadyError(f"model {self._name!r} is shutting down")
        if sequence.finish is not None:
            # Its cache is dropped once it ends; asked again it would be prefilled anew.
            raise RuntimeError("a finished sequence has no next step")
        future: asyncio.Future[GenerateChunk] = asyncio.get_running_loop().create_future()
        self._waiting.append((sequence, future))
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run_loop(), name=f"decode-{self._name}")
        return future

    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                async with self._slots:
                    batch = self._running = self._take()
                    if not batch:
                        break
                    try:
                        results = await loop.run_in_executor(
                            self._pool, self._job, [s for s, _ in batch]
                        )
                    except PROPAGATE:
                        raise
                    except BaseException as exc:  # a Rust panic in the tokenizer too
                        log.exception("decode step of model %s failed", self._name)
                        results = [exc] * len(batch)
                    finally:
                        self._running = []
                answered = []
                for (sequence, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                        answered.append(sequence)
                await self._regroup(answered)

    async def _regroup(self, answered: list[Sequence]) -> None:
        """Let the generations just answered ask for their next steps before a job is cut.

        Each asks in its answer's done-callback, one turn of the event loop after the answer; a
        job cut before that would leave them out, and the two groups would then take turns
        for good, each step half as full (and each change of company re-packs the caches).
        """
        going = [s for s in answered if s.finish is None]
        for _ in range(REGROUP_TURNS):
            asked = {id(entry[0]) for entry in self._waiting}
            if all(id(s) in asked for s in going):
                return
            await asyncio.sleep(0)

    def _take(self) -> list[tuple[Sequence, asyncio.Future[GenerateChunk]]]:
        """The next job, as next_job chooses it; [] if none waits."""
        # A cancelled caller costs no forward pass.
        live = [entry for entry in self._waiting if not entry[1].done()]
        chosen, self._prefilled_last = next_job(
            [entry[0].cache is None for entry in live],
            prefilled_last=self._prefilled_last,
            max_batch=self._max_batch,
        )
        batch = [live[i] for i in chosen]
        taken = {id(entry) for entry in batch}
        self._waiting = deque(entry for entry in live if id(entry) not in taken)
        return batch

    def _job(self, sequences: list[Sequence]) -> list[GenerateChunk | BaseException]:
        """On a model thread: prefill new sequences, and one shared step for the others.

        The token masks of constrained sequences are computed on the mask thread meanwhile:
        they depend only on the tokens already chosen. A sequence whose token choice fails
        gets its own error; the others go on.
        """
        constraints = [s.constraint for s in sequences if s.constraint is not None]
        masks = (
            self._mask_thread().submit(formats.compute_all, constraints) if constraints else None
        )
        try:
            rows = self._forward(sequences)
        finally:
            if masks is not None:
                masks.result()  # compute_all leaves each failure with its own sequence
        self.steps += len(sequences)
        answers = [_advance(sequence, row) for sequence, row in zip(sequences, rows, strict=True)]
        for sequence in sequences:
            if sequence.finish is not None:
                # Its past is a view into the step's packed batch: dropped now, the batch is
                # freed once the others have moved on, not when the caller lets go.
                sequence.cache = None
        return answers

    def _mask_thread(self) -> ThreadPoolExecutor:
        if self._masks is None:
            self._masks = ThreadPoolExecutor(1, thread_name_prefix=f"masks-{self._name}")
        return self._masks

    def _forward(self, sequences: list[Sequence]) -> list[npt.NDArray[np.float32]]:
        """Each sequence's next-token logits: a prefill for new ones, one step for the rest."""
        rows: dict[int, npt.NDArray[np.float32]] = {}
        for index, sequence in enumerate(sequences):
            if sequence.cache is None:
                t0 = sequence.started_ns = time.perf_counter_ns()
                rows[index], sequence.cache = self._decoder.prefill(sequence.prompt.ids)
                sequence.inference_us += (time.perf_counter_ns() - t0) // 1000
                sequence.batch_size = max(sequence.batch_size, 1)
        running = [i for i in range(len(sequences)) if i not in rows]
        if running:
            t0 = time.perf_counter_ns()
            step, caches = self._decoder.step(
                [sequences[i].cache for i in running], [sequences[i].last_token for i in running]
            )
            spent = (time.perf_counter_ns() - t0) // 1000
            for row, index in enumerate(running):
                sequence = sequences[index]
                sequence.cache = caches[row]
                sequence.inference_us += spent
                sequence.batch_size = max(sequence.batch_size, len(running))
                rows[index] = step[row]
        return [rows[i] for i in range(len(sequences))]

    async def close(self) -> None:
        """Refuse new steps and fail the waiting and running ones."""
        self._closed = True
        for _, future in [*self._waiting, *self._running]:
            if not future.done():
                future.set_exception(
                    ModelNotReadyError(f"model {self._name!r} stopped; retry on another instance")
                )
        self._waiting.clear()
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._masks is not None:
            self._masks.shutdown(wait=False)


def _advance(sequence: Sequence, logits: npt.NDArray[np.float32]) -> GenerateChunk | BaseException:
    try:
        return sequence.advance(logits)
    except PROPAGATE:
        raise
    except SidecarError as exc:  # the request's own (a format it cannot follow): no fault
        return exc
    except BaseException as exc:  # this sequence's failure (a detokenizer panic too)
        log.exception("choosing the next token failed")
        return exc
