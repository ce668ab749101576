"""A generation asks for its next decode step as its last answer arrives, not when its caller
takes it, and at most LOOKAHEAD answers ahead of the caller."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sidecar.dataplane.generation import LOOKAHEAD, _Steps
from sidecar.domain import FinishReason, GenerateChunk
from sidecar.errors import ModelNotReadyError


class Scheduler:
    """Hands out the futures of the steps asked for; the test answers them."""

    def __init__(self) -> None:
        self.asked: list[asyncio.Future[GenerateChunk]] = []
        self.closed = False

    def submit(self, sequence: Any) -> asyncio.Future[GenerateChunk]:
        if self.closed:
            raise ModelNotReadyError("shutting down")
        self.asked.append(asyncio.get_running_loop().create_future())
        return self.asked[-1]

    async def answer(self, token: int, finish: FinishReason | None = None) -> None:
        self.asked[-1].set_result(GenerateChunk(str(token), [token], finish))
        await asyncio.sleep(0)  # the answer's callbacks run


def steps(scheduler: Scheduler) -> _Steps:
    return _Steps(scheduler, object())  # type: ignore[arg-type]


async def test_the_next_step_is_asked_for_when_the_answer_arrives() -> None:
    scheduler = Scheduler()
    running = steps(scheduler)
    assert len(scheduler.asked) == 1
    await scheduler.answer(1)
    arrived = time.perf_counter_ns()
    # Nobody has taken the answer yet: the next step is already waiting for its run.
    assert len(scheduler.asked) == 2
    await asyncio.sleep(0.05)
    assert (await running.next()).token_ids == [1]
    # Its time is when it arrived, not when it was taken (what TTFT and ITL report).
    assert running.arrived_ns <= arrived


async def test_a_caller_that_stops_taking_answers_holds_the_steps_back() -> None:
    scheduler = Scheduler()
    running = steps(scheduler)
    for token in range(LOOKAHEAD):
        await scheduler.answer(token)
    assert len(scheduler.asked) == LOOKAHEAD  # the last answer asked for no more
    assert (await running.next()).token_ids == [0]
    assert len(scheduler.asked) == LOOKAHEAD + 1  # taking one resumes the steps
    await scheduler.answer(LOOKAHEAD, FinishReason.LENGTH)
    assert len(scheduler.asked) == LOOKAHEAD + 1  # the last chunk asks for nothing
    taken = [await running.next() for _ in range(LOOKAHEAD)]
    assert [c.token_ids for c in taken] == [[t] for t in range(1, LOOKAHEAD + 1)]
    assert taken[-1].finish is FinishReason.LENGTH
    assert len(scheduler.asked) == LOOKAHEAD + 1


async def test_closing_withdraws_the_step_and_drops_a_late_answer() -> None:
    scheduler = Scheduler()
    running = steps(scheduler)
    await scheduler.answer(1)
    running.close()
    assert scheduler.asked[-1].cancelled()
    # An answer already set when the caller leaves: its callback asks for nothing more.
    scheduler = Scheduler()
    running = steps(scheduler)
    scheduler.asked[-1].set_result(GenerateChunk("1", [1]))
    running.close()
    await asyncio.sleep(0)
    assert len(scheduler.asked) == 1


async def test_a_failed_step_raises_after_the_answers_before_it() -> None:
    scheduler = Scheduler()
    running = steps(scheduler)
    await scheduler.answer(1)
    scheduler.asked[-1].set_exception(RuntimeError("step failed"))
    await asyncio.sleep(0)
    assert (await running.next()).token_ids == [1]
    with pytest.raises(RuntimeError, match="step failed"):
        await running.next()
    # A model that shuts down between two steps fails the generation the same way.
    scheduler = Scheduler()
    running = steps(scheduler)
    scheduler.closed = True
    await scheduler.answer(1)
    assert (await running.next()).token_ids == [1]
    with pytest.raises(ModelNotReadyError):
        await running.next()


async def test_an_answer_whose_callback_has_not_run_is_not_asked_for_twice() -> None:
    scheduler = Scheduler()
    running = steps(scheduler)
    await scheduler.answer(1)
    # The second step's answer is set, its callback not run yet, when the caller takes the
    # first: that step is still in flight for the sequence, so nothing is asked for then.
    scheduler.asked[-1].set_result(GenerateChunk("2", [2]))
    assert (await running.next()).token_ids == [1]
    assert len(scheduler.asked) == 2
    await asyncio.sleep(0)
    assert len(scheduler.asked) == 3
    assert (await running.next()).token_ids == [2]


async def test_a_step_withdrawn_by_another_hand_fails_the_generation_not_hangs_it() -> None:
    scheduler = Scheduler()
    running = steps(scheduler)
    scheduler.asked[-1].cancel()  # not through close(): the answer will never come
    await asyncio.sleep(0)
    with pytest.raises(ModelNotReadyError, match="withdrawn"):
        await asyncio.wait_for(running.next(), 1)
