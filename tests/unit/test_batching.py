"""The batcher and its planner, driven through a real thread pool with a gated model function.

The model function here is deterministic arithmetic on the inputs it is handed, so each
test can see exactly which inputs ran together, and hold a batch open while others queue.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pytest

from sidecar.batching.batcher import Batcher, BatchLimits, BatchOutput, Work
from sidecar.batching.planner import MAX_ADDED_COST, plan
from sidecar.errors import DeadlineExceededError, ModelNotReadyError, OverloadedError
from sidecar.generation.scheduler import next_job
from sidecar.runtime.threads import Lane, ThreadBudget


@dataclass(frozen=True)
class Text:
    tag: int
    length: int


class Model:
    """Returns [tag, length] per input; records batches; can be held shut or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[Text]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.poison: set[int] = set()
        self.threads: list[int | None] = []  # the lane each pass asked for
        self._lock = threading.Lock()
        self.inside = self.most_inside = 0  # passes running at once

    def __call__(self, items: list[Text], threads: int | None = None) -> BatchOutput:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            return self._pass(items, threads)
        finally:
            with self._lock:
                self.inside -= 1

    def _pass(self, items: list[Text], threads: int | None) -> BatchOutput:
        self.entered.set()
        self.gate.wait(10)
        self.threads.append(threads)
        self.batches.append(items)
        if any(item.tag in self.poison for item in items):
            raise RuntimeError("backend failed on this batch")
        rows = np.array([[item.tag, item.length] for item in items], dtype=np.float32)
        return BatchOutput(rows=rows, inference_us=1, postprocess_us=1)

    def seen(self) -> set[int]:
        return {item.tag for batch in self.batches for item in batch}


LIMITS = BatchLimits(
    max_batch_tokens=512, max_batch_size=8, max_batch_delay_s=0, max_queue_size=64, workers=1
)


@pytest.fixture
async def pools() -> AsyncIterator[tuple[ThreadPoolExecutor, ThreadPoolExecutor]]:
    with ThreadPoolExecutor(1) as model_pool, ThreadPoolExecutor(2) as prepare_pool:
        yield model_pool, prepare_pool


def make(
    model: Model, pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor], limits: BatchLimits = LIMITS
) -> Batcher[Text]:
    return Batcher("m", model, limits, *pools)


async def submit(
    batcher: Batcher[Text], texts: Sequence[Text], deadline: float | None = None
) -> np.ndarray:
    job = await batcher.submit(Work(len(texts), lambda: list(texts), deadline))
    assert list(job.inputs) == list(texts)
    return job.rows


async def queued(batcher: Batcher[Text], count: int) -> None:
    """Wait until `count` inputs are queued (tokenized, in no batch yet): a fixed sleep is
    not always long enough on a loaded machine."""
    for _ in range(5000):
        if len(batcher._pending) >= count:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{count} inputs were not queued in time")


async def hold_first_batch(batcher: Batcher[Text], model: Model) -> asyncio.Task[np.ndarray]:
    """Start one call and keep its batch running (the gate is shut) so others must queue."""
    model.gate.clear()
    first = asyncio.create_task(submit(batcher, [Text(999, 4)]))
    await asyncio.to_thread(model.entered.wait, 5)
    return first


# The planner -----------------------------------------------------------------------------


def test_plan_keeps_the_oldest_and_groups_similar_lengths() -> None:
    lengths = [100, 10, 250, 105, 12, 98, 240]
    chosen = plan(lengths, max_tokens=10_000, max_size=8)
    assert 0 in chosen
    assert sorted(lengths[i] for i in chosen) == [98, 100, 105]


@pytest.mark.parametrize("seed", range(20))
def test_plan_respects_the_token_budget_and_count_cap(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(8, 257, size=int(rng.integers(1, 80)))]
    chosen = plan(lengths, max_tokens=1024, max_size=6)
    assert 0 in chosen
    assert len(chosen) <= 6
    assert len(chosen) == 1 or len(chosen) * max(lengths[i] for i in chosen) <= 1024


def test_plan_will_not_pad_a_short_input_to_a_long_one() -> None:
    assert plan([256, 8], max_tokens=10_000, max_size=8) == [0]
    # ...but pads a little when it pays: 240 costs 256 padded, under MAX_ADDED_COST times 240.
    assert MAX_ADDED_COST >= 256 / 240
    assert plan([256, 240], max_tokens=10_000, max_size=8) == [0, 1]


def test_plan_draws_only_from_the_oldest_max_size_inputs() -> None:
    # Three inputs of the oldest one's length wait further back: they do not jump the queue.
    assert plan([100, 20, 250, 100, 100, 100], max_tokens=10_000, max_size=3) == [0]
    assert plan([100, 20, 100, 100, 100, 100], max_tokens=10_000, max_size=3) == [0, 2]


def test_plan_runs_an_input_over_the_budget_alone() -> None:
    assert plan([600, 600], max_tokens=512, max_size=8) == [0]
    assert plan([], max_tokens=512, max_size=8) == []


# The batcher -----------------------------------------------------------------------------


async def test_results_go_back_to_the_right_caller(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    model = Model()
    batcher = make(model, pools)
    first = await hold_first_batch(batcher, model)
    calls = [[Text(10 * c + i, 8 + 3 * c + i) for i in range(c % 3 + 1)] for c in range(20)]
    tasks = [asyncio.create_task(submit(batcher, texts)) for texts in calls]
    await queued(batcher, sum(len(texts) for texts in calls))
    model.gate.set()
    results = await asyncio.gather(*tasks)
    for texts, rows in zip(calls, results, strict=True):
        assert rows.tolist() == [[t.tag, t.length] for t in texts]
    await first
    # The 20 calls queued behind the first batch shared batches.
    assert len(model.batches) < 1 + sum(len(c) for c in calls)
    assert batcher.depth == 0
    await batcher.close()


async def test_batches_keep_the_token_budget_and_the_count_cap(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    model = Model()
    batcher = make(model, pools)
    first = await hold_first_batch(batcher, model)
    lengths = [8, 200, 120, 30, 250, 64, 64, 64, 64, 64, 64, 64, 64, 64, 100, 16, 17, 18]
    tasks = [asyncio.create_task(submit(batcher, [Text(i, n)])) for i, n in enumerate(lengths)]
    await queued(batcher, len(lengths))
    model.gate.set()
    await asyncio.gather(first, *tasks)
    for batch in model.batches[1:]:
        assert len(batch) <= LIMITS.max_batch_size
        assert (
            len(batch) == 1 or len(batch) * max(t.length for t in batch) <= LIMITS.max_batch_tokens
        )
    assert model.seen() == {999, *range(len(lengths))}
    # The eighteen queued inputs shared batches; the nine 64-token ones at most three.
    assert len(model.batches) - 1 < len(lengths)
    assert sum(any(t.length == 64 for t in b) for b in model.batches) <= 3
    await batcher.close()


async def test_a_backend_error_reaches_every_caller_of_that_batch(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    model = Model()
    batcher = make(model, pools)
    first = await hold_first_batch(batcher, model)
    model.poison = {1}
    tasks = [asyncio.create_task(submit(batcher, [Text(i, 50)])) for i in range(4)]
    await queued(batcher, 4)
    model.gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    failed_batch = next(b for b in model.batches if any(t.tag == 1 for t in b))
    assert len(failed_batch) == 4  # all four queued together and ran together
    for outcome in outcomes:
        assert isinstance(outcome, RuntimeError)
        assert "backend failed" in str(outcome)
    await first
    # The batcher goes on.
    model.poison = set()
    assert (await submit(batcher, [Text(7, 9)])).tolist() == [[7, 9]]
    await batcher.close()


async def test_a_deadline_passed_in_the_queue_never_reaches_the_model(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    model = Model()
    batcher = make(model, pools)
    first = await hold_first_batch(batcher, model)
    late = asyncio.create_task(submit(batcher, [Text(5, 20)], deadline=time.monotonic() + 0.05))
    on_time = asyncio.create_task(submit(batcher, [Text(6, 20)]))
    with pytest.raises(DeadlineExceededError, match="while queued, before the model ran"):
        await late
    assert batcher.depth == 1  # only the one still waiting
    model.gate.set()
    await asyncio.gather(first, on_time)
    assert 5 not in model.seen()
    assert 6 in model.seen()
    await batcher.close()


async def test_a_deadline_already_passed_is_refused_before_tokenizing(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    model = Model()
    batcher = make(model, pools)
    prepared: list[int] = []
    with pytest.raises(DeadlineExceededError):
        await batcher.submit(
            Work(1, lambda: prepared.append(1) or [Text(1, 1)], time.monotonic() - 1)
        )
    assert not prepared
    assert batcher.depth == 0


async def test_a_cancelled_call_leaves_the_queue(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    model = Model()
    batcher = make(model, pools)
    first = await hold_first_batch(batcher, model)
    gone = asyncio.create_task(submit(batcher, [Text(5, 20), Text(6, 21)]))
    await queued(batcher, 2)
    assert batcher.depth == 2
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert batcher.depth == 0
    model.gate.set()
    await first
    assert (await submit(batcher, [Text(7, 9)])).tolist() == [[7, 9]]
    assert model.seen() == {999, 7}
    await batcher.close()


async def test_a_full_queue_refuses_at_once_with_the_limit(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    model = Model()
    limits = replace(LIMITS, max_queue_size=4)
    batcher = make(model, pools, limits)
    first = await hold_first_batch(batcher, model)
    waiting = asyncio.create_task(submit(batcher, [Text(i, 10) for i in range(3)]))
    await queued(batcher, 3)
    began = time.monotonic()
    with pytest.raises(
        OverloadedError, match=r"3 inputs queued; 2 more would pass max_queue_size 4"
    ):
        await submit(batcher, [Text(8, 10), Text(9, 10)])
    assert time.monotonic() - began < 0.05
    # One more still fits.
    fits = asyncio.create_task(submit(batcher, [Text(10, 10)]))
    model.gate.set()
    await asyncio.gather(first, waiting, fits)
    assert 8 not in model.seen()
    assert 10 in model.seen()
    await batcher.close()


async def test_the_delay_lets_late_inputs_share_a_batch(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    model = Model()
    limits = replace(LIMITS, max_batch_delay_s=0.2)
    batcher = make(model, pools, limits)
    early = asyncio.create_task(submit(batcher, [Text(1, 10)]))
    await asyncio.sleep(0.05)
    late = asyncio.create_task(submit(batcher, [Text(2, 10)]))
    await asyncio.gather(early, late)
    assert [sorted(t.tag for t in b) for b in model.batches] == [[1, 2]]
    await batcher.close()


async def test_close_refuses_what_still_waits(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    model = Model()
    batcher = make(model, pools)
    first = await hold_first_batch(batcher, model)
    waiting = asyncio.create_task(submit(batcher, [Text(5, 20)]))
    await queued(batcher, 1)
    await batcher.close()
    model.gate.set()
    for task in (first, waiting):
        with pytest.raises(ModelNotReadyError, match="stopped before the call ran"):
            await task


async def test_a_call_leaving_while_the_loop_waits_for_a_worker_breaks_nothing(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    model = Model()
    limits = replace(LIMITS, max_batch_delay_s=0.005)
    batcher = make(model, pools, limits)
    first = await hold_first_batch(batcher, model)
    gone = asyncio.create_task(submit(batcher, [Text(5, 20)]))
    await queued(batcher, 1)
    await asyncio.sleep(0.05)  # the loop now waits for the worker with `gone` queued
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    model.gate.set()
    await first
    rows = await asyncio.wait_for(submit(batcher, [Text(7, 9)]), 5)
    assert rows.tolist() == [[7, 9]]
    await batcher.close()


async def test_a_wrong_row_count_fails_the_batch_and_the_batcher_goes_on(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    def short(items: list[Text], threads: int | None = None) -> BatchOutput:
        rows = np.zeros((len(items) - 1, 2), dtype=np.float32) if len(items) > 1 else None
        if rows is None:
            rows = np.array([[items[0].tag, items[0].length]], dtype=np.float32)
        return BatchOutput(rows=rows, inference_us=1, postprocess_us=1)

    model = Model()
    batcher = make(model, pools)
    first = await hold_first_batch(batcher, model)
    batcher._run_batch = short  # the next batches come back one row short
    tasks = [asyncio.create_task(submit(batcher, [Text(i, 30)])) for i in range(3)]
    await queued(batcher, 3)
    model.gate.set()
    await first
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        assert isinstance(outcome, RuntimeError)
        assert "returned 2 rows for 3 inputs" in str(outcome)
    assert (await asyncio.wait_for(submit(batcher, [Text(7, 9)]), 5)).tolist() == [[7, 9]]
    await batcher.close()


async def test_batchers_sharing_workers_cut_a_batch_only_when_one_is_free(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    model, other = Model(), Model()
    slots = ThreadBudget(1)
    first_batcher = Batcher("a", model, LIMITS, *pools, slots)
    second_batcher = Batcher("b", other, LIMITS, *pools, slots)
    first = await hold_first_batch(first_batcher, model)
    late = asyncio.create_task(
        submit(second_batcher, [Text(5, 20)], deadline=time.monotonic() + 0.1)
    )
    # The other model's call waits for the shared worker in the queue, so its deadline
    # drops it there: it never reaches its model.
    with pytest.raises(DeadlineExceededError, match="while queued"):
        await late
    model.gate.set()
    await first
    assert not other.batches
    await first_batcher.close()
    await second_batcher.close()


async def test_a_closed_batcher_refuses_new_calls(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    batcher = make(Model(), pools)
    await batcher.close()
    with pytest.raises(ModelNotReadyError, match="stopped before the call ran"):
        await submit(batcher, [Text(1, 1)])


@pytest.mark.parametrize(
    ("fresh", "prefilled_last", "want"),
    [
        ([], False, ([], False)),
        ([True, True], False, ([0], True)),  # one prefill at a time
        ([True, True], True, ([0], True)),  # nothing else waits: prefills go on
        ([False, True, False], False, ([1], True)),  # a prompt waits at most one step
        ([False, True, False], True, ([0, 2], False)),  # then the running ones take a turn
        ([False] * 5, True, ([0, 1, 2], False)),  # at most max_batch steps share a run
    ],
)
def test_the_next_decode_job_alternates_prefills_and_shared_steps(
    fresh: list[bool], prefilled_last: bool, want: tuple[list[int], bool]
) -> None:
    assert next_job(fresh, prefilled_last=prefilled_last, max_batch=3) == want


# Adapting passes: one thread each while the queue is deep, every thread when it is not.
LANES = (Lane(1, 1), Lane(2, None))


async def test_a_lone_call_runs_wide_and_a_deep_queue_runs_narrow_passes_side_by_side() -> None:
    model, budget = Model(), ThreadBudget(2, wide=2)
    with ThreadPoolExecutor(2) as model_pool, ThreadPoolExecutor(2) as prepare_pool:
        limits = replace(LIMITS, max_batch_size=1)
        batcher = Batcher("m", model, limits, model_pool, prepare_pool, budget, lanes=LANES)
        assert (await submit(batcher, [Text(1, 4)])).tolist() == [[1, 4]]
        assert model.threads == [None]  # nothing else waited: the whole budget
        assert budget.free == 2
        model.gate.clear()
        calls = [asyncio.create_task(submit(batcher, [Text(i, 4)])) for i in range(2, 6)]
        for _ in range(5000):
            if model.inside == 2:
                break
            await asyncio.sleep(0.001)
        # Two single-threaded passes hold one unit each; the other calls wait for a unit.
        assert (model.inside, budget.free) == (2, 0)
        model.gate.set()
        rows = await asyncio.gather(*calls)
        assert [r.tolist() for r in rows] == [[[i, 4]] for i in range(2, 6)]
        assert model.threads[1:3] == [1, 1]
        assert model.most_inside == 2
        assert budget.free == 2
        await batcher.close()


async def test_a_wide_pass_of_another_engine_waits_for_the_narrow_ones_and_goes_first() -> None:
    model, budget = Model(), ThreadBudget(2, wide=2)
    with ThreadPoolExecutor(2) as model_pool, ThreadPoolExecutor(2) as prepare_pool:
        limits = replace(LIMITS, max_batch_size=1)
        batcher = Batcher("m", model, limits, model_pool, prepare_pool, budget, lanes=LANES)
        model.gate.clear()
        first = [asyncio.create_task(submit(batcher, [Text(i, 4)])) for i in range(2)]
        for _ in range(5000):
            if model.inside == 2:
                break
            await asyncio.sleep(0.001)
        order: list[str] = []

        async def decode_step() -> None:  # what a decode scheduler does for each step
            async with budget:
                order.append("wide")

        step = asyncio.create_task(decode_step())
        await asyncio.sleep(0.01)
        later = asyncio.create_task(submit(batcher, [Text(9, 4)]))
        await asyncio.sleep(0.01)
        assert not order  # both units are held by the narrow passes
        model.gate.set()
        await asyncio.gather(step, later, *first)
        # The wide step asked first: the later call's pass ran after it, not before.
        assert order == ["wide"]
        assert model.batches[-1] == [Text(9, 4)]
        assert budget.free == 2
        await batcher.close()


async def test_closing_gives_back_the_units_of_every_batch(
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
) -> None:
    model, budget = Model(), ThreadBudget(1)
    batcher = Batcher("m", model, LIMITS, *pools, budget)
    first = await hold_first_batch(batcher, model)
    waiting = asyncio.create_task(submit(batcher, [Text(2, 4)]))
    await queued(batcher, 1)
    assert budget.free == 0
    await batcher.close()
    # Another engine sharing the budget must not wait for ever on units nobody holds.
    assert budget.free == 1
    model.gate.set()
    for call in (first, waiting):
        with pytest.raises(ModelNotReadyError):
            await call
