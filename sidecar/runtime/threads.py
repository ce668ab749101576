"""The CPU threads forward passes share, and how many this process may use.

Every engine (encoder batchers, decode schedulers) takes its threads from one budget
before it starts a forward pass and gives them back after, so passes of all models never
ask for more cores than the process has. On a CPU the budget counts cores: a pass that
runs on ONNX Runtime with two intra-op threads takes two. With fixed workers
(`inference_workers` >= 1) it counts passes instead, one unit each.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


def cpu_count(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota.

    A pod limited to 2 CPUs on a 64-core node sees 64 cores in os.cpu_count(); threads
    sized by it would contend for a quota of 2 and stall at every period's end.
    """
    # Linux has the process's affinity; elsewhere the machine's count is all there is.
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota(root: Path) -> float | None:
    """CPUs the cgroup allows (v2 cpu.max, else v1 cfs quota / period); None if unlimited."""
    try:
        fields = (root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


@dataclass(frozen=True)
class Lane:
    """One way to run a model's forward pass: the budget units it takes, and the intra-op
    threads it asks the backend for (None: the session's own setting)."""

    units: int
    threads: int | None


class ThreadBudget:
    """A count of free units, taken and given back by forward passes, first come first served.

    A waiter for many units blocks later waiters for fewer, so a decode step that needs
    every core is not starved by a stream of half-width encoder passes.
    `async with budget:` takes `wide` units, the share of a pass that uses every thread.
    """

    def __init__(self, capacity: int, wide: int = 1) -> None:
        if not 1 <= wide <= capacity:
            raise ValueError(f"wide ({wide}) must be within 1..capacity ({capacity})")
        self.capacity = capacity
        self.wide = wide
        self._free = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def free(self) -> int:
        """Units no pass holds now."""
        return self._free

    async def acquire(self, units: int) -> None:
        """Wait until `units` are free and no earlier caller still waits, then take them."""
        units = min(units, self.capacity)
        if not self._waiters and self._free >= units:
            self._free -= units
            return
        future = asyncio.get_running_loop().create_future()
        entry = (units, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(units)  # granted just as the wait was cancelled
            else:
                if entry in self._waiters:  # _wake may have dropped it already
                    self._waiters.remove(entry)
                self._wake()
            raise

    def try_acquire(self, units: int) -> bool:
        """Take `units` now if they are free and nobody waits; never blocks."""
        if self._waiters or self._free < units:
            return False
        self._free -= units
        return True

    def release(self, units: int) -> None:
        """Give back what a pass took."""
        self._free = min(self.capacity, self._free + min(units, self.capacity))
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._free:
            units, future = self._waiters.popleft()
            if future.done():
                continue
            self._free -= units
            future.set_result(None)

    async def __aenter__(self) -> None:
        await self.acquire(self.wide)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release(self.wide)
