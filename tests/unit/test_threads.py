"""The thread budget forward passes share, and the cores a cgroup quota leaves the process."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sidecar.runtime.threads import ThreadBudget, cpu_count


def test_a_cgroup_quota_caps_the_cores(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert cpu_count(tmp_path) == cores  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_count(tmp_path) == cores
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still runs one thread
    assert cpu_count(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{100000 * (cores + 3)} 100000\n")
    assert cpu_count(tmp_path) == cores  # a quota above the affinity changes nothing


def test_a_cgroup_v1_quota_caps_the_cores(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_count(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert cpu_count(tmp_path) == len(os.sched_getaffinity(0))


async def test_units_are_granted_first_come_first_served() -> None:
    budget = ThreadBudget(2, wide=2)
    await budget.acquire(1)
    granted: list[str] = []

    async def take(name: str, units: int) -> None:
        await budget.acquire(units)
        granted.append(name)

    wide = asyncio.create_task(take("wide", 2))
    await asyncio.sleep(0)
    narrow = asyncio.create_task(take("narrow", 1))
    await asyncio.sleep(0.01)
    # One unit is free, but the wide waiter came first: the narrow one may not pass it.
    assert granted == []
    assert not budget.try_acquire(1)
    budget.release(1)
    await wide
    assert granted == ["wide"]
    assert budget.free == 0
    budget.release(2)
    await narrow
    assert granted == ["wide", "narrow"]
    assert budget.free == 1


async def test_a_cancelled_waiter_gives_way() -> None:
    budget = ThreadBudget(2, wide=2)
    await budget.acquire(2)
    wide = asyncio.create_task(budget.acquire(2))
    await asyncio.sleep(0)
    narrow = asyncio.create_task(budget.acquire(1))
    await asyncio.sleep(0)
    wide.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wide
    budget.release(1)
    await asyncio.wait_for(narrow, 1)
    assert budget.free == 0
    budget.release(1)
    budget.release(1)
    assert budget.free == 2


def test_wide_is_within_the_capacity() -> None:
    with pytest.raises(ValueError, match="wide"):
        ThreadBudget(2, wide=3)
